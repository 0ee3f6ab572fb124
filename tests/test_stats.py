"""Music statistics: each feature on pieces with known answers, the distribution comparison, `musicgen stats`."""

import csv
import json

import numpy as np
import pytest

from musicgen_jax import cli, events, prepare, stats
from musicgen_jax.errors import UserError
from musicgen_jax.store import Events

C_MAJOR = [60, 62, 64, 65, 67, 69, 71, 72]


def from_notes(pitch, start, end, velocity=80) -> Events:
  """The canonical event stream of notes (releases first at equal times, as `events.note_sequence_to_events`)."""
  pitch, start, end = (np.asarray(x, np.float64) for x in (pitch, start, end))
  velocity = np.broadcast_to(np.asarray(velocity, np.float64), pitch.shape)
  time = np.concatenate([start, end])
  pitches = np.concatenate([pitch, pitch])
  velocities = np.concatenate([velocity, np.zeros_like(velocity)])
  order = np.lexsort((velocities, pitches, velocities > 0, time))
  return Events(pitches[order].astype(np.uint8), np.diff(time[order], prepend=0.0).astype(np.float32),
                velocities[order].astype(np.uint8))


def scale(step=0.5, pitches=C_MAJOR) -> Events:
  """One note after another, each held until the next starts."""
  start = np.arange(len(pitches)) * step
  return from_notes(pitches, start, start + step)


def test_c_major_scale():
  features = stats.piece_features(scale())
  expected_histogram = np.zeros(12)
  expected_histogram[[0, 2, 4, 5, 7, 9, 11]] = [2, 1, 1, 1, 1, 1, 1]
  np.testing.assert_allclose(features["pitch_class_histogram"], expected_histogram / 8)
  transitions = features["pitch_class_transitions"].reshape(12, 12)
  np.testing.assert_allclose(transitions[[0, 2, 4, 5, 7, 9, 11], [2, 4, 5, 7, 9, 11, 0]], 1 / 7)
  assert transitions.sum() == pytest.approx(1.0)
  assert features["pitch_range"] == 12 and features["pitches_used"] == 8
  assert features["note_density"] == pytest.approx(2.0)  # 8 notes in 4 s
  assert features["ioi_histogram"][np.searchsorted(stats.IOI_EDGES, 0.5, side="right") - 1] == 1.0
  assert features["duration_histogram"][np.searchsorted(stats.DURATION_EDGES, 0.5, side="right") - 1] == 1.0
  assert features["velocity_mean"] == 80 and features["velocity_std"] == 0
  assert features["velocity_histogram"][80 // 16] == 1.0
  assert features["mean_polyphony"] == pytest.approx(1.0)  # each note ends as the next starts
  assert features["repeated_note_rate"] == 0 and features["release_share"] == 0.5
  assert features["clipped_dt_share"] == 0


def test_a_midi_file_gives_the_same_statistics(tmp_path):
  events.write_midi(scale(), tmp_path / "scale.mid")
  read = stats.piece_features(events.midi_to_events(tmp_path / "scale.mid"))
  for name, value in stats.piece_features(scale()).items():
    np.testing.assert_allclose(read[name], value, atol=1e-3, err_msg=name)


def test_chord_polyphony_velocity_and_simultaneous_onsets():
  chord = from_notes([60, 64, 67], [0, 0, 0], [1, 1, 1], velocity=[60, 80, 100])
  features = stats.piece_features(chord)
  assert features["mean_polyphony"] == pytest.approx(3.0)
  assert features["velocity_mean"] == pytest.approx(80.0)
  assert features["velocity_std"] == pytest.approx(np.sqrt(800 / 3))
  assert features["ioi_histogram"][0] == 1.0  # both intervals are 0 s
  assert features["note_density"] == pytest.approx(3.0)


def test_polyphony_is_averaged_over_sounding_time_only():
  piece = from_notes([60, 64, 67, 72], [0, 0, 0, 2], [1, 1, 1, 3])  # a chord, 1 s of silence, one note
  assert stats.piece_features(piece)["mean_polyphony"] == pytest.approx(2.0)
  assert stats.piece_features(piece)["note_density"] == pytest.approx(4 / 3)


def test_repeated_notes_and_dt_at_the_clip():
  repeated = scale(pitches=[60] * 5)
  assert stats.piece_features(repeated)["repeated_note_rate"] == 1.0
  clipped = Events(np.array([60, 60, 62, 62], np.uint8), np.array([0.0, 4.0, 3.99, 4.0], np.float32),
                   np.array([70, 0, 70, 0], np.uint8))
  assert stats.piece_features(clipped, max_dt=4.0)["clipped_dt_share"] == 0.5
  assert stats.piece_features(clipped, max_dt=3.0)["clipped_dt_share"] == 0.75


def test_unpaired_releases_count_in_the_release_share():
  stream = Events(np.array([60, 62, 60], np.uint8), np.array([0.0, 0.5, 0.5], np.float32),
                  np.array([90, 0, 0], np.uint8))
  features = stats.piece_features(stream)
  assert features["release_share"] == pytest.approx(2 / 3)
  assert features["note_density"] == pytest.approx(1.0)


def test_an_empty_piece_is_all_zeros():
  empty = Events(np.zeros(0, np.uint8), np.zeros(0, np.float32), np.zeros(0, np.uint8))
  for name, value in stats.piece_features(empty).items():
    assert np.all(value == 0), name


def varied_scales(count: int, seed: int, density: float = 2.0) -> list[Events]:
  """Scales of random length, tempo and key: a small corpus with spread in every feature."""
  rng = np.random.default_rng(seed)
  return [scale(step=1 / (density * rng.uniform(0.7, 1.3)), pitches=list(rng.integers(48, 72) + np.cumsum(
      rng.choice([1, 2], rng.integers(8, 30))))) for _ in range(count)]


def test_identical_sets_overlap_exactly():
  features = stats.feature_matrices(varied_scales(12, seed=0))
  for name, result in stats.compare(features, features).items():
    assert result["overlap"] == pytest.approx(1.0), name
    assert result["kl"] == pytest.approx(0.0, abs=1e-4), name
    assert result["spread"] in (None, pytest.approx(1.0)), name


def test_a_denser_set_overlaps_less_on_density():
  reference = stats.feature_matrices(varied_scales(20, seed=0))
  similar = stats.compare(stats.feature_matrices(varied_scales(20, seed=1)), reference)["note_density"]
  denser = stats.compare(stats.feature_matrices(varied_scales(20, seed=1, density=4.0)), reference)["note_density"]
  assert denser["overlap"] < similar["overlap"] - 0.3
  assert denser["kl"] > similar["kl"]
  assert denser["mean"] > 1.5 * similar["mean"]


def test_one_outlier_among_equal_values_barely_moves_the_overlap():
  # The reference's velocity is one value (as the chorales'); 31 of 32 judged pieces have it, one has a note at 69.
  pieces = lambda velocities: stats.feature_matrices(
      [from_notes(C_MAJOR, np.arange(8), np.arange(8) + 1, velocity) for velocity in velocities])
  reference = pieces([90] * 12)
  overlaps = stats.compare(pieces([np.full(8, 90)] * 31 + [np.array([90, 90, 69, 90, 90, 90, 90, 90])]), reference)
  for name in ("velocity_mean", "velocity_std", "velocity_histogram"):
    assert overlaps[name]["overlap"] > 0.9, name
  # Spread out, it still counts: a quarter of the pieces at 69 overlap far less.
  quarter = pieces([69 if i % 4 == 0 else 90 for i in range(32)])
  assert stats.compare(quarter, reference)["velocity_mean"]["overlap"] < 0.8


def test_overlap_of_point_masses_and_of_disjoint_samples():
  assert stats.overlap_and_kl(np.zeros(5), np.zeros(3)) == (1.0, 0.0)
  overlap, kl = stats.overlap_and_kl(np.zeros(5), np.full(3, 10.0))
  assert overlap < 1e-6 and kl > 10


def maestro_corpus(root) -> list[Events]:
  """Three MAESTRO recordings of 2 to 3 minutes, cut into 300-event pieces."""
  with open(root / "maestro-v3.0.0.csv", newline="", encoding="utf-8") as f:
    rows = sorted(csv.DictReader(f), key=lambda row: row["midi_filename"])
  names = [row["midi_filename"] for row in rows if 120 <= float(row["duration"]) <= 180][:3]
  return [piece for name in names for piece in stats.excerpts(events.midi_to_events(root / name), 300)]


def synthetic_corpus() -> list[Events]:
  """Stepwise melodies in C major: strong pitch-class transitions."""
  rng = np.random.default_rng(0)
  degrees = np.array([0, 2, 4, 5, 7, 9, 11])
  pieces = []
  for _ in range(60):
    steps = np.cumsum(rng.choice([-1, 1], 60)) + 14
    pitches = 48 + 12 * (steps // 7) + degrees[steps % 7]
    pieces.append(scale(step=0.25, pitches=list(pitches)))
  return pieces


def shuffled_pitches(piece: Events, rng: np.random.Generator) -> Events:
  """The same notes with their pitches permuted: the same pitch classes in another order."""
  notes = events.note_arrays(piece)
  return from_notes(rng.permutation(notes.pitch), notes.start, notes.end, notes.velocity)


@pytest.mark.parametrize("source", ["maestro", "synthetic"])
def test_shuffled_pitches_score_worse_on_transitions(request, source):
  corpus = maestro_corpus(request.getfixturevalue("maestro")) if source == "maestro" else synthetic_corpus()
  reference, real = corpus[0::2], corpus[1::2]
  rng = np.random.default_rng(0)
  shuffled = [shuffled_pitches(piece, rng) for piece in real]
  reference_features = stats.feature_matrices(reference)
  real_scores = stats.compare(stats.feature_matrices(real), reference_features)
  shuffled_scores = stats.compare(stats.feature_matrices(shuffled), reference_features)
  transitions = "pitch_class_transitions"
  assert shuffled_scores[transitions]["overlap"] < real_scores[transitions]["overlap"] - 0.05
  assert shuffled_scores["pitch_class_transitions"]["kl"] > real_scores["pitch_class_transitions"]["kl"]
  assert shuffled_scores["pitch_class_histogram"]["overlap"] == pytest.approx(
      real_scores["pitch_class_histogram"]["overlap"], abs=1e-3)


def write_pieces(folder, pieces):
  folder.mkdir(parents=True, exist_ok=True)
  for i, piece in enumerate(pieces):
    events.write_midi(piece, folder / f"piece_{i:02d}.mid")
  return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A generated folder, a MIDI reference folder and its preparation (with train and validation splits)."""
  root = tmp_path_factory.mktemp("stats")
  write_pieces(root / "generated", varied_scales(6, seed=2, density=3.0))
  write_pieces(root / "midi", varied_scales(16, seed=3))
  manifest = prepare.prepare_corpus([str(root / "midi")], root / "prepared", val_fraction=0.3, progress=False)
  assert {"train", "validation"} <= manifest["splits"].keys()
  return root


def run_cli(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_stats_json_against_a_prepared_folder_has_the_ceiling(capsys, folders):
  code, out, err = run_cli(capsys, "stats", folders / "generated", "--reference", folders / "prepared", "--json")
  assert code == 0, err
  report = json.loads(out)
  assert report["generated"]["pieces"] == 6
  assert report["reference"]["split"] == "validation" and report["ceiling"]["split"] == "train"
  assert report["reference"]["pieces"] + report["ceiling"]["pieces"] == 16
  assert set(report["features"]) == set(stats.FEATURES)
  density = report["features"]["note_density"]
  assert density["generated"]["mean"] > density["ceiling"]["mean"]
  assert density["generated"]["overlap"] < density["ceiling"]["overlap"]
  assert 0 <= report["mean_overlap"]["generated"] < report["mean_overlap"]["ceiling"] <= 1


def test_stats_table_against_a_midi_folder_has_no_ceiling(capsys, folders):
  code, out, err = run_cli(capsys, "stats", folders / "generated", "--reference", folders / "midi")
  assert code == 0, err
  assert "ceiling" not in out and "overlap" in out
  assert all(name in out for name in stats.FEATURES)


@pytest.mark.parametrize("argv, message", [
    (["{root}/missing", "--reference", "{root}/midi"], "missing does not exist"),
    (["{root}/empty", "--reference", "{root}/midi"], "holds no MIDI files"),
    (["{root}/generated", "--reference", "{root}/missing"], "missing does not exist"),
    (["{root}/generated", "--reference", "{root}/prepared", "--split", "test"], "no 'test' split"),
    (["{root}/garbage", "--reference", "{root}/midi"], "can be read"),
    (["{root}/generated", "--reference", "{root}/midi", "--max-dt", "0"], "--max-dt"),
])
def test_stats_mistakes_are_one_line_and_exit_2(capsys, folders, argv, message):
  (folders / "empty").mkdir(exist_ok=True)
  (folders / "garbage").mkdir(exist_ok=True)
  (folders / "garbage" / "noise.mid").write_bytes(b"not MIDI")
  code, _, err = run_cli(capsys, "stats", *(a.format(root=folders) for a in argv))
  assert code == 2
  assert err.count("\n") == 1 and err.startswith("musicgen: error: ") and message in err


def test_excerpts_are_consecutive_and_whole():
  piece = varied_scales(1, seed=0)[0]
  cut = stats.excerpts(piece, 10)
  assert len(cut) == len(piece) // 10 and all(len(excerpt) == 10 for excerpt in cut)
  np.testing.assert_array_equal(np.concatenate([excerpt.pitch for excerpt in cut]), piece.pitch[:len(cut) * 10])
  np.testing.assert_array_equal(cut[1].dt, piece.dt[10:20])
  assert stats.excerpts(piece, len(piece) + 1) == []


def test_excerpts_judge_generated_pieces_against_real_music_of_their_length(tmp_path, capsys):
  """A real piece that is slow then fast: whole, its density is its notes over its seconds; cut into excerpts
  as long as the generated pieces, the slow and the fast excerpts are the reference, each its own density."""
  slow, fast = scale(step=1.0, pitches=C_MAJOR * 2), scale(step=0.25, pitches=C_MAJOR * 2)
  real = Events.concatenate([slow, fast])  # 32 notes in 16 + 4 seconds.
  write_pieces(tmp_path / "real", [real])
  write_pieces(tmp_path / "generated", [fast, slow, fast])
  code, out, err = run_cli(capsys, "stats", tmp_path / "generated", "--reference", tmp_path / "real", "--json")
  whole = json.loads(out)
  code, out, err = run_cli(capsys, "stats", tmp_path / "generated", "--reference", tmp_path / "real", "--json",
                           "--excerpts")
  assert code == 0, err
  cut = json.loads(out)
  density = lambda piece: stats.piece_features(piece)["note_density"][0]
  assert whole["excerpt_events"] is None and whole["reference"]["pieces"] == 1
  assert whole["features"]["note_density"]["reference_mean"] == pytest.approx(32 / 20.0, abs=0.01)
  assert cut["excerpt_events"] == len(fast) == len(slow) and cut["reference"]["pieces"] == 2
  assert cut["features"]["note_density"]["reference_mean"] == pytest.approx((density(slow) + density(fast)) / 2,
                                                                            abs=0.01)
  assert cut["mean_overlap"]["generated"] > whole["mean_overlap"]["generated"]
  code, out, err = run_cli(capsys, "stats", tmp_path / "generated", "--reference", tmp_path / "real", "--excerpts")
  assert code == 0 and "2 excerpts of 32 events" in out


def test_excerpts_longer_than_every_real_piece_are_a_clear_error(capsys, folders):
  long_piece = scale(step=0.1, pitches=C_MAJOR * 40)
  write_pieces(folders / "long", [long_piece])
  code, _, err = run_cli(capsys, "stats", folders / "long", "--reference", folders / "prepared", "--excerpts")
  assert code == 2 and err.count("\n") == 1
  assert "no piece of the validation split" in err and "640 events" in err


def test_load_set_reads_a_single_file(folders):
  pieces = stats.load_set(folders / "generated" / "piece_00.mid", "validation")
  assert len(pieces) == 1 and len(pieces[0]) > 0
  with pytest.raises(UserError):
    stats.load_set(folders / "nowhere", "validation")
