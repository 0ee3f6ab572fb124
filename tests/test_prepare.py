"""`prepare_corpus`: sources and splits, filter, skipped files, user errors, cache, and the store it writes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from musicgen_jax import prepare, store
from musicgen_jax.errors import UserError
from musicgen_jax.events import midi_to_events
from tests.test_events import midi_bytes, note


def tune(seed: int, channel: int = 0) -> bytes:
  """A small distinct MIDI file: a few notes whose pitches depend on `seed`."""
  return midi_bytes(sum((note(0.2 * i, 0.2 * i + 0.3, 40 + (seed * 7 + i * 5) % 48, channel=channel)
                         for i in range(4)), []))


def make_files(root: Path, names: list[str]) -> list[Path]:
  paths = []
  for seed, name in enumerate(names):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tune(seed))
    paths.append(path)
  return paths


def prepare_quietly(sources: list, out: Path, **options) -> dict:
  return prepare.prepare_corpus([str(s) for s in sources], out, progress=False, **options)


def assert_store_matches_files(out: Path, manifest: dict) -> None:
  """Each split holds, piece by piece, the events `midi_to_events` reads from the file the manifest names."""
  for split, entry in manifest["splits"].items():
    opened = store.open_split(out, split)
    assert opened.num_pieces == entry["files"] == len(entry["pieces"])
    assert int(opened.offsets[-1]) == entry["events"]
    for index, path in enumerate(entry["pieces"]):
      expected = midi_to_events(path)
      for field in store.FIELDS:
        np.testing.assert_array_equal(getattr(opened.piece(index), field), getattr(expected, field))


def test_hash_split_is_stable_and_honours_the_fraction():
  assert [prepare.hash_split(f"piece-{i}.mid", 0.1) for i in range(6)] == [
      prepare.hash_split(f"piece-{i}.mid", 0.1) for i in range(6)]
  shares = [np.mean([prepare.hash_split(f"folder/piece-{i}.mid", f) == "validation" for i in range(4000)])
            for f in (0.0, 0.1, 0.3)]
  assert shares[0] == 0 and abs(shares[1] - 0.1) < 0.02 and abs(shares[2] - 0.3) < 0.03


def test_folder_source_split_by_hash_of_relative_path(tmp_path):
  names = [f"set{i % 3}/piece{i}.{suffix}" for i, suffix in zip(range(30), ["mid", "MID", "midi", "Smf", "MIDI"] * 6)]
  make_files(tmp_path / "src", names + ["notes.txt"])
  manifest = prepare_quietly([tmp_path / "src"], tmp_path / "out", val_fraction=0.3)
  by_split = {split: sorted(Path(p).relative_to(tmp_path / "src").as_posix() for p in entry["pieces"])
              for split, entry in manifest["splits"].items()}
  assert by_split == {split: sorted(n for n in names if prepare.hash_split(n, 0.3) == split)
                      for split in ("train", "validation")}
  assert_store_matches_files(tmp_path / "out", manifest)
  assert manifest["format_version"] == store.FORMAT_VERSION and manifest["skipped"] == []
  assert manifest["options"] == {"sustain": True, "val_fraction": 0.3, "filter": None}
  assert json.loads((tmp_path / "out" / prepare.MANIFEST).read_text()) == manifest


def test_single_files_split_by_name_and_counted_once(tmp_path):
  a, b = make_files(tmp_path / "src", ["a.mid", "deep/b.midi"])
  manifest = prepare_quietly([a, b, tmp_path / "src", a], tmp_path / "out", val_fraction=0.5)
  pieces = {p: split for split, entry in manifest["splits"].items() for p in entry["pieces"]}
  assert sorted(pieces) == sorted(str(p) for p in (a, b))
  assert pieces[str(a)] == prepare.hash_split("a.mid", 0.5) and pieces[str(b)] == prepare.hash_split("b.midi", 0.5)


def maestro_root(root: Path, rows: list[tuple[str, str, str, str]], files: dict[str, Path | bytes]) -> Path:
  """A MAESTRO-like root: a CSV of (composer, title, split, midi_filename) rows, files written or symlinked."""
  root.mkdir(parents=True)
  with open(root / "maestro-v3.0.0.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["canonical_composer", "canonical_title", "split", "year", "midi_filename", "duration"])
    writer.writerows([composer, title, split, 2018, name, 1.0] for composer, title, split, name in rows)
  for name, content in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
      (root / name).symlink_to(content)
    else:
      (root / name).write_bytes(content)
  return root


ROWS = [("Claude Debussy", "Clair de Lune", "train", "2018/a.midi"),
        ("Frédéric Chopin", "Ballade No. 1, Op. 23", "validation", "2018/b.midi"),
        ("Johann Sebastian Bach", "Prelude in C, WTC I", "test", "2017/c.midi"),
        ("Claude Debussy", "Arabesque No. 1", "train", "2017/missing.midi")]


@pytest.fixture
def small_maestro(tmp_path) -> Path:
  return maestro_root(tmp_path / "maestro", ROWS, {name: tune(i) for i, (*_, name) in enumerate(ROWS[:3])})


def test_maestro_root_uses_its_csv_split(small_maestro, tmp_path, capsys):
  manifest = prepare_quietly([small_maestro], tmp_path / "out", val_fraction=0.9)
  assert {split: entry["pieces"] for split, entry in manifest["splits"].items()} == {
      "train": [str(small_maestro / "2018/a.midi")], "validation": [str(small_maestro / "2018/b.midi")],
      "test": [str(small_maestro / "2017/c.midi")]}
  assert manifest["skipped"] == [{"path": str(small_maestro / "2017/missing.midi"), "reason": "file not found"}]
  assert "skipped 1 of 4" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("DEBUSSY", ["2018/a.midi"]), ("op. 23", ["2018/b.midi"]),
                                            ("2017/", ["2017/c.midi"]), ("c.MIDI", ["2017/c.midi"])])
def test_filter_on_maestro_composer_title_and_path(small_maestro, tmp_path, text, expected):
  manifest = prepare_quietly([small_maestro], tmp_path / "out", filter_text=text)
  kept = [p for entry in manifest["splits"].values() for p in entry["pieces"]]
  assert kept == [str(small_maestro / name) for name in expected]
  assert manifest["options"]["filter"] == text


def test_filter_on_folder_paths(tmp_path):
  make_files(tmp_path / "src", ["debussy/one.mid", "Debussy-two.mid", "bach/three.mid"])
  manifest = prepare_quietly([tmp_path / "src"], tmp_path / "out", filter_text="debuSSy", val_fraction=0.0)
  assert sorted(manifest["splits"]["train"]["pieces"]) == [str(tmp_path / "src" / n)
                                                           for n in ("Debussy-two.mid", "debussy/one.mid")]


def test_filter_matching_nothing_is_a_user_error(tmp_path):
  make_files(tmp_path / "src", ["a.mid"])
  with pytest.raises(UserError, match="--filter 'Ravel' matches none of the 1 pieces"):
    prepare_quietly([tmp_path / "src"], tmp_path / "out", filter_text="Ravel")


BAD_FILES = {
    "random.mid": np.random.default_rng(0).bytes(300),
    "truncated.mid": tune(1)[:40],
    "empty.mid": b"",
    "text.midi": b"These are not the notes you are looking for.\n",
    "drums.mid": tune(2, channel=9),
}


def test_bad_files_skipped_and_reported(tmp_path, capsys):
  make_files(tmp_path / "src", ["good.mid"])
  for name, content in BAD_FILES.items():
    (tmp_path / "src" / name).write_bytes(content)
  (tmp_path / "src" / "folder.mid").mkdir()
  manifest = prepare_quietly([tmp_path / "src"], tmp_path / "out", val_fraction=0.0)
  assert manifest["splits"]["train"]["pieces"] == [str(tmp_path / "src" / "good.mid")]
  reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
  assert reasons == {"random.mid": "not a MIDI file", "truncated.mid": "truncated MIDI data", "empty.mid": "empty file",
                     "text.midi": "not a MIDI file", "drums.mid": "no notes", "folder.mid": "is a directory"}
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("skipped 6 of 7 MIDI files (2 not a MIDI file, ")


def test_no_readable_piece_is_a_user_error(tmp_path):
  for name, content in BAD_FILES.items():
    (tmp_path / name).write_bytes(content)
  with pytest.raises(UserError, match="none of the 5 MIDI files has readable notes"):
    prepare_quietly([tmp_path], tmp_path / "out")
  assert not (tmp_path / "out" / prepare.MANIFEST).exists()


@pytest.mark.parametrize("make_source, message", [
    (lambda root: root / "nowhere", "does not exist"),
    (lambda root: root, "holds no MIDI files"),
])
def test_unusable_sources_are_user_errors(tmp_path, make_source, message):
  (tmp_path / "readme.txt").write_text("no music here")
  with pytest.raises(UserError, match=message):
    prepare_quietly([make_source(tmp_path)], tmp_path / "out")


@pytest.mark.parametrize("option, value, message", [("workers", 0, "--workers must be at least 1"),
                                                    ("val_fraction", 1.0, "--val-fraction must be in"),
                                                    ("file_timeout", 0.0, "--file-timeout must be a positive")])
def test_bad_options_are_user_errors(tmp_path, option, value, message):
  make_files(tmp_path / "src", ["a.mid"])
  with pytest.raises(UserError, match=message):
    prepare_quietly([tmp_path / "src"], tmp_path / "out", **{option: value})


def test_out_dir_holding_other_files_is_refused(tmp_path):
  make_files(tmp_path / "src", ["a.mid"])
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "thesis.tex").write_text("precious")
  with pytest.raises(UserError, match="already holds other files"):
    prepare_quietly([tmp_path / "src"], tmp_path / "out")


def test_rerun_reads_from_the_cache(tmp_path):
  paths = make_files(tmp_path / "src", [f"p{i}.mid" for i in range(5)])
  (tmp_path / "src" / "bad.mid").write_bytes(b"junk")
  first = prepare_quietly([tmp_path / "src"], tmp_path / "out")
  assert first["cache"] == {"hits": 0, "parsed": 6}
  second = prepare_quietly([tmp_path / "src"], tmp_path / "out")
  assert second["cache"] == {"hits": 6, "parsed": 0}
  assert {k: v for k, v in second.items() if k != "cache"} == {k: v for k, v in first.items() if k != "cache"}
  paths[0].write_bytes(tune(99))
  assert prepare_quietly([tmp_path / "src"], tmp_path / "out")["cache"] == {"hits": 5, "parsed": 1}
  assert_store_matches_files(tmp_path / "out", prepare_quietly([tmp_path / "src"], tmp_path / "out"))
  assert prepare_quietly([tmp_path / "src"], tmp_path / "out", sustain=False)["cache"] == {"hits": 0, "parsed": 6}
  assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]


def test_smaller_rerun_removes_splits_it_no_longer_has(small_maestro, tmp_path):
  prepare_quietly([small_maestro], tmp_path / "out")
  manifest = prepare_quietly([small_maestro], tmp_path / "out", filter_text="Debussy")
  assert list(manifest["splits"]) == ["train"]
  assert not store.split_dir(tmp_path / "out", "test").exists()


def test_real_maestro_files_in_worker_processes(maestro, tmp_path):
  smallest = sorted(maestro.glob("*/*.midi"), key=lambda p: p.stat().st_size)[:3]
  rows = [("Composer", "Title", split, f"{split}/{p.name}")
          for p, split in zip(smallest, ["train", "train", "validation"])]
  root = maestro_root(tmp_path / "maestro", rows, {row[3]: path for row, path in zip(rows, smallest)})
  manifest = prepare_quietly([root], tmp_path / "out", workers=2)
  assert manifest["cache"] == {"hits": 0, "parsed": 3}
  assert [entry["files"] for entry in manifest["splits"].values()] == [2, 1]
  assert_store_matches_files(tmp_path / "out", manifest)


def karaoke_file(path: Path) -> None:
  """A karaoke (.kar) file as mido writes one: a type-1 MIDI file whose first tracks hold the karaoke marker
  and the lyrics as text events, then a track of notes."""
  import mido

  lyrics = [mido.MetaMessage("text", text=syllable, time=240) for syllable in ("\\Twin", "kle ", "twin")]
  words = mido.MidiTrack([mido.MetaMessage("text", text="@KMIDI KARAOKE FILE"), *lyrics])
  notes = mido.MidiTrack()
  for i, pitch in enumerate((60, 60, 67, 67)):
    notes.append(mido.Message("note_on", note=pitch, velocity=70, time=0 if i == 0 else 120))
    notes.append(mido.Message("note_off", note=pitch, velocity=0, time=240))
  mido.MidiFile(type=1, ticks_per_beat=480, tracks=[words, notes]).save(path)


def test_karaoke_and_rmid_files_are_read(tmp_path):
  from tests.test_reliability import rmid

  (tmp_path / "src").mkdir()
  karaoke_file(tmp_path / "src" / "song.KAR")
  (tmp_path / "src" / "windows.rmi").write_bytes(rmid(tune(3)))
  manifest = prepare_quietly([tmp_path / "src"], tmp_path / "out", val_fraction=0.0)
  assert sorted(Path(p).name for p in manifest["splits"]["train"]["pieces"]) == ["song.KAR", "windows.rmi"]
  assert_store_matches_files(tmp_path / "out", manifest)
  assert store.open_split(tmp_path / "out", "train").piece(0).pitch.tolist() == [60, 60, 60, 60, 67, 67, 67, 67]
