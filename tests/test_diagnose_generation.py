"""scripts/diagnose_generation.py on a tiny run: the real pieces' side of every view is what the pieces hold,
and the model's side is a distribution's expectation."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicgen_jax import cli, models, store
from musicgen_jax.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
PIECES, LENGTH, PRIMER, CONTINUATION, SEGMENT = 3, 48, 24, 24, 16


def random_piece(rng: np.random.Generator, length: int) -> store.Events:
  """Onsets of silent pitches and releases of sounding ones, chords (dt 0) and a few gaps longer than the
  time head's last bin."""
  sounding, pitch, velocity = set(), [], []
  for _ in range(length):
    if sounding and rng.random() < 0.5:
      pitch.append(rng.choice(sorted(sounding)))
      sounding.discard(pitch[-1])
      velocity.append(0)
    else:
      pitch.append(rng.choice(sorted(set(range(40, 80)) - sounding)))
      sounding.add(pitch[-1])
      velocity.append(rng.integers(1, 128))
  dt = rng.choice(np.array([0.0, 0.05, 0.1, 0.3, 5.0], np.float32), size=length, p=[0.3, 0.3, 0.2, 0.15, 0.05])
  return store.Events(np.array(pitch, np.uint8), dt, np.array(velocity, np.uint8))


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory) -> tuple[Path, Path, list[store.Events]]:
  root = tmp_path_factory.mktemp("diagnose")
  rng = np.random.default_rng(0)
  pieces = [random_piece(rng, 64) for _ in range(PIECES)]
  store.write_corpus(root / "data", {"train": pieces, "validation": pieces})
  assert cli.main(["train", "--workdir", str(root / "run"), "--config", "tiny", "--data", str(root / "data"),
                   "--quiet", "train.steps=2", "train.log_every=1"]) == 0
  return root / "run", root / "data", pieces


@pytest.fixture
def diagnose(run_python):
  """`scripts/diagnose_generation.py ARGS` in a new process."""
  return lambda *args: run_python(str(REPO / "scripts" / "diagnose_generation.py"), *args)


def held_after_each_event(piece: store.Events) -> np.ndarray:
  sounding, counts = set(), []
  for pitch, velocity in zip(piece.pitch, piece.velocity):
    (sounding.add if velocity else sounding.discard)(int(pitch))
    counts.append(len(sounding))
  return np.array(counts)


def test_the_real_side_is_what_the_pieces_hold_and_the_model_side_a_distribution(run_and_data, diagnose):
  run, data, pieces = run_and_data
  process = diagnose("--workdir", str(run), "--data", str(data), "--pieces", str(PIECES), "--length", str(LENGTH),
                     "--primer", str(PRIMER), "--continuation", str(CONTINUATION), "--segment", str(SEGMENT), "--json")
  assert process.returncode == 0, process.stderr
  report = json.loads(process.stdout)
  max_dt = load_config("tiny").sample.max_dt
  dt = np.stack([np.minimum(p.dt, max_dt) for p in pieces])
  velocity = np.stack([p.velocity for p in pieces])
  assert [row["events"] for row in report["real"]] == [[0, 16], [16, 32], [32, 48]]
  for row in report["real"]:
    lo, hi = row["events"]
    assert row["dt_ms"] == pytest.approx(1e3 * dt[:, lo:hi].mean(), rel=1e-5)
    assert row["release_rate"] == pytest.approx(np.mean(velocity[:, lo:hi] == 0))
  for row in report["real"] + report["own samples"]:
    assert 0.0 <= row["expected_dt_ms"] <= 1e3 * max_dt and 0.0 <= row["p_release"] <= 1.0 + 1e-6
    assert row["tempo_correlation"] is None or -1.0 <= row["tempo_correlation"] <= 1.0
  held = np.stack([held_after_each_event(p) for p in pieces])[:, PRIMER:PRIMER + CONTINUATION]
  onsets, gaps = velocity[:, PRIMER:PRIMER + CONTINUATION] > 0, dt[:, PRIMER:PRIMER + CONTINUATION]
  assert [row["events"] for row in report["continuation"]] == [[0, 16], [16, 24]]
  primer_tempo = np.log(dt[:, PRIMER - SEGMENT:PRIMER].mean(axis=1))
  for row in report["continuation"]:
    lo, hi = row["events"]
    assert row["real_notes_per_s"] == pytest.approx(onsets[:, lo:hi].sum() / gaps[:, lo:hi].sum(), rel=1e-5)
    assert row["real_held"] == pytest.approx(held[:, lo:hi].mean())
    assert row["ratio"] == pytest.approx(row["drawn_notes_per_s"] / row["real_notes_per_s"])
    continued = np.log(gaps[:, lo:hi].mean(axis=1))  # Each piece's tempo against its primer's last segment's.
    assert row["real_tempo_kept"] == pytest.approx(np.corrcoef(primer_tempo, continued)[0, 1], rel=1e-5)
    assert row["drawn_tempo_kept"] is None or -1.0 <= row["drawn_tempo_kept"] <= 1.0
  context = report["context"]
  assert context["events"] == [32, 48]
  for name in ("real", "own samples"):  # From the start, the last segment reads as the depth view's last row.
    assert context[name]["from_start_ms"] == pytest.approx(report[name][-1]["expected_dt_ms"], rel=1e-5)
    assert 0.0 <= context[name]["segment_alone_ms"] <= 1e3 * max_dt
  tables = diagnose("--workdir", str(run), "--data", str(data), "--pieces", str(PIECES), "--length", str(LENGTH),
                    "--primer", str(PRIMER), "--continuation", str(CONTINUATION), "--segment", str(SEGMENT))
  assert tables.returncode == 0 and "free-running after a primer of 24 events" in tables.stdout
  assert "kept drawn" in tables.stdout and "tempo r" in tables.stdout
  assert "expected dt read from the start against from a zero state" in tables.stdout


def test_too_few_long_pieces_is_one_line(run_and_data, diagnose):
  run, data, _ = run_and_data
  process = diagnose("--workdir", str(run), "--data", str(data), "--pieces", "4", "--length", "16", "--primer", "8",
                     "--continuation", "8")
  assert process.returncode == 1
  assert process.stderr.strip().splitlines()[-1] == (
      "diagnose_generation: error: validation holds 3 pieces of at least 16 events, not 4: ask for fewer "
      "--pieces or shorter --length, --primer or --continuation")


def test_a_model_that_halves_each_tempo_has_gain_one_half(monkeypatch):
  """The gain is the slope of the expected tempo on the actual (a model pulling every piece halfway to the
  average tempo has gain 0.5, not 2), and a view without spread has no correlation."""
  monkeypatch.syspath_prepend(str(REPO / "scripts"))
  import diagnose_generation

  actual = np.log(np.array([0.03, 0.05, 0.08, 0.12]))
  expected = 0.5 * actual + 0.5 * np.log(0.06)
  assert diagnose_generation.gain(actual, expected) == pytest.approx(0.5)
  assert diagnose_generation.correlation(actual, expected) == pytest.approx(1.0)
  assert diagnose_generation.correlation(actual, np.full(4, 0.1)) is None
  dt = np.array([[0.04, 0.06, 9.0], [0.0, 0.0, 0.0]])  # Gaps clipped at max_dt; a row of one chord.
  np.testing.assert_allclose(diagnose_generation.tempo(dt, 4.0), np.log([(0.1 + 4.0) / 3, 1e-6]))


@pytest.mark.parametrize("order", ["pitch,velocity,time", "velocity,pitch,time"])
def test_a_release_is_as_likely_as_the_sampler_allows(order, monkeypatch):
  """P(release) is a probability, 0 where nothing sounds (the first event, after the start event's release, and
  wherever all notes have ended): the pitch head's mass on sounding pitches, or the velocity head's class 0
  restricted as the sampler does."""
  monkeypatch.syspath_prepend(str(REPO / "scripts"))
  import diagnose_generation

  config = apply_overrides(load_config("tiny"), [f"model.order={tuple(order.split(','))!r}"])
  model = models.MusicLSTM(config.model, rngs=nnx.Rngs(params=0))
  piece = random_piece(np.random.default_rng(1), 40)
  events = {"pitch": jnp.asarray(piece.pitch[None], jnp.int32), "dt": jnp.asarray(piece.dt[None]),
            "velocity": jnp.asarray(piece.velocity[None], jnp.float32)}
  predicted = diagnose_generation.teacher_forced(model, events)
  release, held = np.asarray(predicted["p_release"])[0], np.asarray(predicted["held"])[0]
  assert np.array_equal(held, np.concatenate([[0], held_after_each_event(piece)[:-1]]))
  assert np.all(release[held == 0] == 0.0) and np.all((release[held > 0] > 0.0) & (release[held > 0] < 1.0))
  assert 0 < np.sum(held == 0) < len(held)
  window = diagnose_generation.teacher_forced(model, events, 25)  # From a zero state, the held notes given.
  assert np.array_equal(np.asarray(window["held"])[0], held[25:])
  assert np.all(np.asarray(window["p_release"])[0][held[25:] == 0] == 0.0)
  assert not np.allclose(np.asarray(window["expected_dt"])[0], np.asarray(predicted["expected_dt"])[0, 25:])
  # The notes held before the window: those the first 25 events leave sounding (the start event sounds nothing).
  before = models.held_pitches(*(events[k][:, :24] for k in ("pitch", "dt", "velocity")))[:, -1]
  inputs = {k: v[:, 24:-1] for k, v in events.items()}
  outputs, _ = model(inputs, targets={k: v[:, 25:] for k, v in events.items()}, held=before)
  direct = diagnose_generation.expected_dt(outputs["time_logits"], model.time_bins)
  np.testing.assert_allclose(np.asarray(window["expected_dt"]), np.asarray(direct), rtol=1e-5)
