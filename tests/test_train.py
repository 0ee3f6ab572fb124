"""The training loop: it learns, stops and resumes bit-identically, checkpoints reload exactly."""

import json
import re

import jax
import numpy as np
import pytest

from musicgen_jax import checkpointing, events, generate, models, plots, sampling, steps, store, train
from musicgen_jax.config import apply_overrides, load_config, read_config
from musicgen_jax.errors import UserError


def scale_corpus(seed: int, pieces: int = 6, length: int = 400) -> list[store.Events]:
  """Ascending scales with steady timing: a pattern a tiny model learns within a hundred steps."""
  rng = np.random.default_rng(seed)
  result = []
  for _ in range(pieces):
    start = rng.integers(40, 60)
    onsets = (start + np.arange(length // 2) % 24).astype(np.uint8)
    pitch = np.stack([onsets, onsets], 1).reshape(-1)
    velocity = np.stack([np.full_like(onsets, 80), np.zeros_like(onsets)], 1).reshape(-1)
    dt = np.tile(np.array([0.25, 0.125], np.float32), length // 2)
    result.append(store.Events(pitch, dt, velocity))
  return result


def tempo_corpus(seed: int, pieces: int = 8) -> list[store.Events]:
  """`scale_corpus` with every other piece four times as slow: 2.67 and 0.67 notes a second."""
  return [store.Events(p.pitch, p.dt * np.float32(4.0 if i % 2 else 1.0), p.velocity)
          for i, p in enumerate(scale_corpus(seed, pieces))]


def texture_corpus(seed: int, pieces: int = 8, notes: int = 200) -> list[store.Events]:
  """`scale_corpus`'s notes and timing, the even pieces with each note held over the next three onsets: all at
  2.67 notes a second, the even ones at about 3.6 notes sounding at once, the odd ones at 1."""
  rng = np.random.default_rng(seed)
  result = []
  for i in range(pieces):
    pitches = rng.integers(40, 60) + np.arange(notes) % 24
    onset_times = 0.375 * np.arange(notes)
    times = np.concatenate([onset_times, onset_times + 0.25 + (0.0 if i % 2 else 1.125)])
    order = np.lexsort((np.r_[np.ones(notes), np.zeros(notes)], times))  # Releases first at the same time.
    result.append(store.Events(np.r_[pitches, pitches][order].astype(np.uint8),
                               np.diff(times[order], prepend=0.0).astype(np.float32),
                               np.r_[np.full(notes, 80), np.zeros(notes)][order].astype(np.uint8)))
  return result


def notes_per_second(path) -> float:
  stream = events.midi_to_events(path, sustain=False)
  return float(np.sum(stream.velocity > 0) / np.sum(stream.dt, dtype=np.float64))


def notes_at_once(path) -> float:
  """The mean notes sounding of a file, as the polyphony control measures it."""
  stream = {k: np.asarray(v)[None] for k, v in vars(events.midi_to_events(path, sustain=False)).items()}
  return float(np.exp(window_polyphony(stream)[0]) * models.POLYPHONY_REFERENCE)


def window_polyphony(stream: dict) -> np.ndarray:
  """The polyphony control of whole streams [B, T] (`sampling.primer_controls`, compiled)."""
  return np.asarray(jax.jit(sampling.primer_controls, static_argnums=0)(("polyphony",), stream)["polyphony"])


# A control: (a corpus at two values of it, the low and the high value, generate's option, a file's value).
CONTROL_RUNS = {"density": (tempo_corpus, 2 / 3, 8 / 3, "notes_per_second", notes_per_second),
                "polyphony": (texture_corpus, 1.0, 3.62, "polyphony", notes_at_once)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  store.write_corpus(root, {"train": scale_corpus(0), "validation": scale_corpus(1, pieces=2)})
  return root


def tiny(corpus, *overrides):
  return apply_overrides(load_config("tiny"), (f"data.dir={corpus}", "train.log_every=10",
                                               "train.eval_every=20", "train.checkpoint_every=20",
                                               "data.eval_windows=16", *overrides))


def params_of(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.parametrize("heads", ["regression", "distribution"])
def test_loss_decreases_and_metrics_are_logged(corpus, tmp_path, heads):
  train.train_and_evaluate(tiny(corpus, "train.steps=120", "train.sample_every=60", "train.sample_count=2",
                                "train.sample_length=64", f"model.heads={heads}"), tmp_path, progress=False,
                           samples=plots.log_samples)
  assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_120", "step_60"]
  # Only regression heads decide releases by a threshold: half of the onsets' 80.
  assert read_config(tmp_path).sample.release_threshold == (pytest.approx(40.0) if heads == "regression" else None)
  assert len(list((tmp_path / "samples" / "step_120").glob("*.mid"))) == 2
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for head in ("pitch", "time", "velocity"):
    head_losses = [m[f"train/loss_{head}"] for m in lines if f"train/loss_{head}" in m]
    assert head_losses[-1] < (0.5 if head == "pitch" else 0.9) * head_losses[0], head
  evals = [m for m in lines if "eval/pitch_nll" in m]
  assert evals and evals[-1]["eval/pitch_nll"] < evals[0]["eval/pitch_nll"]
  point_keys = ("train/dt_mae_ms", "train/velocity_rmse")
  likelihood_keys = ("train/time_nll", "train/velocity_nll", "train/total_nll", "train/bits_per_note")
  for key in (*(point_keys if heads == "regression" else likelihood_keys), "train/pitch_accuracy",
              "train/events_per_s", "train/learning_rate_time", "train/step_time_s"):
    assert key in lines[0]
  if heads == "distribution":
    assert evals[-1]["eval/total_nll"] < evals[0]["eval/total_nll"]
  assert all("step" in m for m in lines)
  assert list((tmp_path / "tensorboard").iterdir())


def test_stop_and_resume_is_bit_identical_to_one_run(corpus, tmp_path):
  config = tiny(corpus, "train.steps=40", "model.dropout=0.2", "data.workers=0")
  straight = train.train_and_evaluate(config, tmp_path / "straight", progress=False)
  # Steps run 10 to an execution here (train.log_every=10): the stop lands at the end of the one under way.
  train.train_and_evaluate(config, tmp_path / "resumed", progress=False, stop=lambda step: step >= 7)
  assert checkpointing.checkpoint_manager(tmp_path / "resumed").latest_step() == 10
  resumed = train.train_and_evaluate(read_config(tmp_path / "resumed"), tmp_path / "resumed", progress=False)
  assert int(resumed.step) == 40
  for a, b in zip(params_of(straight), params_of(resumed)):
    np.testing.assert_array_equal(a, b)


def test_execution_steps_divide_every_cadence_of_the_loop(corpus):
  assert steps.execution_steps(tiny(corpus, "train.steps=40").train) == 10
  assert steps.execution_steps(tiny(corpus, "train.steps=40", "train.log_every=4").train) == 2
  assert steps.execution_steps(tiny(corpus, "train.steps=13").train) == 1
  assert steps.execution_steps(tiny(corpus, "train.steps=40", "train.steps_per_execution=1").train) == 1
  with pytest.raises(UserError, match="steps_per_execution"):
    steps.Trainer(tiny(corpus, "train.steps_per_execution=0"))


def test_several_steps_per_execution_equal_as_many_single_steps(corpus):
  from musicgen_jax import input_pipeline

  config = tiny(corpus, "model.dropout=0.2")
  trainer = steps.Trainer(config)
  iterator = input_pipeline.train_iterator(config, corpus)
  batches = [next(iterator) for _ in range(4)]
  state, metrics = jax.tree.map(np.copy, (trainer.initial_state, trainer.zero_metrics()))
  for batch in batches:
    state, metrics = trainer.train_step(state, metrics, trainer.shard_batch(batch))
  together, together_metrics = trainer.train_steps(trainer.initial_state, trainer.zero_metrics(),
                                                   trainer.shard_batches(batches))
  assert int(together.step) == int(state.step) == 4
  for a, b in zip(params_of(state), params_of(together)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(together_metrics["pitch_nll"], metrics["pitch_nll"], rtol=1e-5)


def test_checkpoint_reload_gives_identical_eval_metrics(corpus, tmp_path):
  from musicgen_jax import input_pipeline

  config = tiny(corpus, "train.steps=20")
  state = train.train_and_evaluate(config, tmp_path, progress=False)
  trainer = steps.Trainer(config)
  batches = input_pipeline.eval_batches(config, corpus)
  run = checkpointing.load_run(tmp_path, "latest")
  assert run.step == 20
  assert trainer.evaluate(run.params, batches) == trainer.evaluate(state.params, batches)


def test_non_finite_loss_stops_without_saving(corpus, tmp_path):
  config = tiny(corpus, "train.steps=40", "train.optimizers.pitch.learning_rate=1e30",
                "train.optimizers.pitch.clip_norm=0.0", "train.optimizers.pitch.warmup_steps=0",
                "train.optimizers.pitch.decay=constant")
  with pytest.raises(train.NonFiniteLoss, match=r"loss became NaN or Inf at step \d+"):
    train.train_and_evaluate(config, tmp_path, progress=False)
  manager = checkpointing.checkpoint_manager(tmp_path)
  assert manager.latest_step() is None or manager.latest_step() < 20


def test_missing_data_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="musicgen prepare"):
    train.train_and_evaluate(apply_overrides(load_config("tiny"), [f"data.dir={tmp_path}"]), tmp_path / "run")


def test_metrics_rewind_to_the_checkpoint_and_drop_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 5, "a": 1}\n{"step": 7}\n{"step": 8, "train/lo')
  train.rewind(path, 5)
  assert path.read_text() == '{"step": 1}\n{"step": 5, "a": 1}\n'


DATA_PARALLEL_SCRIPT = """
import sys
import jax
import numpy as np
from musicgen_jax import input_pipeline, steps
from musicgen_jax.config import apply_overrides, load_config

assert jax.device_count() == 4, jax.devices()
params = {}
for devices in (1, 4):
  config = apply_overrides(load_config("tiny"), [f"data.dir={sys.argv[1]}", f"mesh.data={devices}",
                                                 "model.dropout=0.0", "train.batch_size=8"])
  trainer = steps.Trainer(config)
  batches = input_pipeline.train_iterator(config, config.data.dir)
  stacked = trainer.shard_batches([next(batches) for _ in range(5)])  # Five steps in one call, as the loop runs.
  assert len(stacked["inputs"]["pitch"].sharding.device_set) == devices
  state, metrics = trainer.train_steps(trainer.initial_state, trainer.zero_metrics(), stacked)
  assert len(state.params["embed"]["embedding"].value.sharding.device_set) == devices
  params[devices] = [np.asarray(x) for x in jax.tree.leaves(state.params)]
worst = max(float(np.max(np.abs(a - b))) for a, b in zip(params[1], params[4]))
print("max difference", worst)
assert worst < 1e-5, worst
"""


def test_four_devices_match_one_device(corpus, four_cpu_devices):
  import subprocess
  import sys

  result = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT, str(corpus)], env=four_cpu_devices,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "max difference" in result.stdout


PATTERN = np.array([60, 64, 67, 72, 67, 64, 62, 65])


def noisy_pattern_corpus(seed: int, pieces: int = 8, length: int = 600) -> list[store.Events]:
  """An arpeggio pattern with one note in five replaced at random: learnable structure plus noise."""
  rng = np.random.default_rng(seed)
  result = []
  for _ in range(pieces):
    pattern = PATTERN[np.arange(length) % len(PATTERN)]
    pitch = np.where(rng.random(length) < 0.8, pattern, rng.integers(48, 84, length)).astype(np.uint8)
    dt = rng.choice(np.array([0.125, 0.25], np.float32), length)
    result.append(store.Events(pitch, dt, rng.integers(40, 100, length).astype(np.uint8)))
  return result


def test_bfloat16_compute_trains_within_two_percent_of_float32(tmp_path):
  from musicgen_jax import input_pipeline

  store.write_corpus(tmp_path, {"train": noisy_pattern_corpus(0), "validation": noisy_pattern_corpus(10, pieces=2)})
  final = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny(tmp_path, f"model.dtype={dtype}", "data.eval_windows=64")
    trainer = steps.Trainer(config)
    batches = input_pipeline.train_iterator(config, tmp_path)
    state, metrics = trainer.initial_state, trainer.zero_metrics()
    for _ in range(200):
      state, metrics = trainer.train_step(state, metrics, trainer.shard_batch(next(batches)))
    final[dtype] = trainer.evaluate(state.params, input_pipeline.eval_batches(config, tmp_path))["pitch_nll"]
  assert abs(final["bfloat16"] - final["float32"]) <= 0.02 * final["float32"], final


LOCK_HOLDER = """
import sys, time
from musicgen_jax.runlock import run_lock
with run_lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_lock_does_not_block(corpus, tmp_path):
  import subprocess
  import sys

  from musicgen_jax.runlock import run_lock

  with run_lock(tmp_path):
    with pytest.raises(UserError, match="is being trained by process"):
      train.train_and_evaluate(tiny(corpus, "train.steps=2"), tmp_path, progress=False)
  holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  holder.kill()
  holder.wait()
  assert int(train.train_and_evaluate(tiny(corpus, "train.steps=2"), tmp_path, progress=False).step) == 2


def test_loss_decreases_on_a_tiny_real_corpus(maestro, tmp_path):
  from musicgen_jax import prepare

  smallest = sorted(maestro.glob("*/*.midi"), key=lambda path: path.stat().st_size)[:4]
  folder = tmp_path / "midi"
  folder.mkdir()
  for path in smallest:
    (folder / path.name).symlink_to(path)
  prepare.prepare_corpus([str(folder)], tmp_path / "data", workers=1, val_fraction=0.0, progress=False)
  config = tiny(tmp_path / "data", "train.steps=150", "train.log_every=25")
  train.train_and_evaluate(config, tmp_path / "run", progress=False)
  lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  losses = [m["train/loss_pitch"] for m in lines]
  assert losses[-1] < losses[0] - 0.5, losses


def test_bfloat16_train_step_runs_its_matmuls_on_bfloat16_operands():
  """An accelerator runs a float32 matmul as several bfloat16 ones: in a bfloat16 step every matmul,
  forward and backward, reads bfloat16 operands (accumulating in float32), except the three heads'
  output layers and what is added to their outputs, which are float32 by design."""
  config = apply_overrides(load_config("tiny"), ("model.dtype=bfloat16",))
  trainer = steps.Trainer(config)
  rows = (config.train.batch_size, config.data.window)
  events = {"pitch": np.zeros(rows, np.int32), "dt": np.zeros(rows, np.float32), "velocity": np.zeros(rows, np.float32)}
  hlo = trainer.train_step.lower(trainer.initial_state, trainer.zero_metrics(),
                                 {"inputs": events, "targets": events,
                                  "held": np.full((rows[0], 128), -1.0, np.float32)}).as_text()
  operands = re.findall(r"stablehlo\.dot_general [^\n]*: \(tensor<([^>]*)>, tensor<([^>]*)>\)", hlo)
  assert len(operands) >= 30  # The LSTM layers' and the three heads' matmuls, forward and backward.
  float32 = [pair for pair in operands if not all(t.endswith("xbf16") for t in pair)]
  # Their inputs: the last hidden layer's outputs, or the age weights (of the drawn pitch, of every pitch).
  output_inputs = {str(config.model.hidden // config.model.head_divisors[-1]), str(models.AGE_POINTS)}
  # The output layers' forward passes and both gradients (3 x 3); the drawn pitch's age into the outputs of
  # the two heads after the pitch, forward and kernel gradient (2 x 2); the pitch head's release-age weights
  # from its last layer, forward and both gradients (3).
  assert len(float32) == 16, float32
  for pair in float32:
    assert all(t.endswith("xf32") for t in pair) and any(output_inputs & set(t.split("x")[:-1]) for t in pair), pair


def test_the_bar_counts_steps_and_its_eta_leaves_out_the_first_compile(capsys):
  import time

  bar = train.progress_bar(100, 50, True)
  assert bar.desc == "training steps (compiling)" and bar.unit == "step" and bar.n == 50
  time.sleep(0.6)  # The first execution: compiling it takes far longer than a step.
  train.restart_clock(bar, 60)
  bar.update(10)
  info = bar.format_dict
  assert bar.desc == "training steps" and (info["n"], info["initial"], info["total"]) == (70, 60, 100)
  assert info["elapsed"] < 0.6  # The ETA, (total - n) * elapsed / (n - initial), counts this session's steps only.
  bar.close()


def test_continuing_a_finished_run_with_more_steps_follows_the_schedule_of_the_new_total(corpus, tmp_path):
  """The schedule is a function of the step and train.steps: a finished run (whose cosine reached zero)
  continued to a larger train.steps resumes at its step on the cosine of the new total."""
  from musicgen_jax import optimizers

  first = tiny(corpus, "train.steps=20", "train.optimizers.pitch.warmup_steps=0")
  train.train_and_evaluate(first, tmp_path, progress=False)
  longer = apply_overrides(read_config(tmp_path), ["train.steps=40"])
  train.train_and_evaluate(longer, tmp_path, progress=False)
  logged = {m["step"]: m["train/learning_rate_pitch"] for m in map(json.loads, (tmp_path / "metrics.jsonl").open())
            if "train/learning_rate_pitch" in m}
  new, old = optimizers.schedules(longer)["pitch"], optimizers.schedules(first)["pitch"]
  assert logged[20] == pytest.approx(float(old(20)), abs=1e-9) == 0.0
  assert logged[30] == pytest.approx(float(new(30))) and float(new(30)) == pytest.approx(0.5 * 3e-3 * (1 + np.cos(
      np.pi * 30 / 40)))
  assert read_config(tmp_path).train.steps == 40


def test_a_start_refused_by_the_devices_creates_no_run_folder(corpus, tmp_path):
  with pytest.raises(UserError, match="devices are visible"):
    train.train_and_evaluate(tiny(corpus, f"mesh.data={jax.device_count() + 1}", "train.batch_size=32"),
                             tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("control", ["density", "polyphony"])
def test_a_conditioned_run_plays_at_the_control_it_is_told_drawn_or_primed(tmp_path, control):
  """Trained on pieces at two values of a control (2.67 and 0.67 notes a second; 1 and about 3.6 notes sounding
  at once), a run reading it plays files at the value it is given; without one, each file at a value drawn from
  the training pieces' (saved as quantiles when training starts), or at its primer's."""
  corpus, low, high, option, measure = CONTROL_RUNS[control]
  store.write_corpus(tmp_path / "data", {"train": corpus(0), "validation": corpus(1, pieces=2)})
  run = tmp_path / "run"
  train.train_and_evaluate(tiny(tmp_path / "data", "train.steps=200", f"model.condition={control}",
                                "data.time_stretch=0.0", "train.sample_every=200", "train.sample_count=2",
                                "train.sample_length=32"), run, progress=False, samples=plots.log_samples)
  assert len(list((run / "samples" / "step_200").glob("*.mid"))) == 2
  quantiles = read_config(run).sample[f"{control}_quantiles"]
  assert len(quantiles) == train.CONTROL_QUANTILES
  assert (quantiles[0], quantiles[-1]) == (pytest.approx(low, rel=0.02), pytest.approx(high, rel=0.02))

  def played(name, **options):
    files = generate.generate(run, tmp_path / name, num=8, length=128, batch_size=8, progress=False, **options)
    return np.array([measure(path) for path in files])

  at_low, at_high = played("low", **{option: low}), played("high", **{option: high})
  assert np.median(at_high) > 2.0 * np.median(at_low), (at_low, at_high)
  drawn = played("drawn")
  assert np.min(drawn) < 0.6 * np.max(drawn), drawn
  primer = tmp_path / "low.mid"
  events.write_midi(corpus(2, pieces=2)[1], primer)
  primed = played("primed", primer=primer, primer_events=64)
  assert np.median(primed) < 0.6 * np.median(at_high), (primed, at_high)


def test_piece_controls_measure_a_piece_as_the_model_measures_a_window(tmp_path):
  """The training pieces' polyphony, from which generation draws, is the control's measure of the whole piece:
  on random streams with double onsets and releases of silent pitches, as `models.window_polyphony` gives."""
  rng = np.random.default_rng(0)
  pieces = [store.Events(rng.integers(60, 66, n).astype(np.uint8), rng.exponential(0.2, n).astype(np.float32),
                         np.where(rng.random(n) < 0.5, 0, 70).astype(np.uint8)) for n in (50, 120, 80)]
  store.write_corpus(tmp_path, {"train": pieces})
  measured = train.piece_controls(store.open_split(tmp_path, "train"))
  for piece, polyphony, density in zip(pieces, measured["polyphony"], measured["density"]):
    stream = {k: jax.numpy.asarray(getattr(piece, k))[None] for k in store.FIELDS}
    held = jax.jit(models.held_pitches)(stream["pitch"], stream["dt"], stream["velocity"].astype(np.float32))
    np.testing.assert_array_equal(train.sounding_counts(piece.pitch, piece.velocity, np.zeros(len(piece), int)),
                                  np.sum(np.asarray(held[0]) >= 0, axis=-1))
    assert polyphony == pytest.approx(float(np.exp(window_polyphony(stream)[0]) * models.POLYPHONY_REFERENCE), rel=1e-5)
    assert density == pytest.approx(np.sum(piece.velocity > 0) / np.sum(piece.dt, dtype=np.float64), rel=1e-6)
