"""The resumable training loop: compiled steps (`steps.Trainer`) fed by the input pipeline, with logging,
evaluation, checkpoints, exact resume, stop signals, and an optional hook that writes samples.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicgen_jax import atomic, checkpointing, config_checks, input_pipeline, models, optimizers, paths, rundir, store
from musicgen_jax.config import apply_overrides, save_config
from musicgen_jax.errors import UserError
from musicgen_jax.losses import HEADS, summarize
from musicgen_jax.runlock import run_lock
from musicgen_jax.steps import Trainer, TrainState

# train.steps of a run trained until stopped (the menu's empty answer): below the int32 step counter's
# limit, and a multiple of every usual cadence so that steps per execution are not reduced.
UNTIL_STOPPED = 2_000_000_000
CONTROL_QUANTILES = 21  # Quantiles of the training pieces' controls (notes per second, ...) kept for generation.


class SampleHook(Protocol):
  """Writes and shows `num` samples of `length` events from the current parameters at a training step
  (`plots.log_samples` is the one the commands pass); `writer` is the run's TensorBoard writer.
  """

  def __call__(self, run_dir: Path, graphdef: nnx.GraphDef, params: nnx.State, config: ml_collections.ConfigDict,
               step: int, writer: Any, *, num: int, length: int) -> Any: ...


class NonFiniteLoss(RuntimeError):
  """A loss became NaN or Inf; the state of that step is never saved."""


class StopRequest:
  """Turns Ctrl+C and SIGTERM into a flag the loop checks after each step, so a stop always saves."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    if not self.requested:  # Said once: at the default config's scale the final evaluation takes a minute or more.
      print("musicgen: stopping: the steps under way finish, then the validation windows are scored and the run is "
            "saved", file=sys.stderr, flush=True)
    self.requested = True

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class MetricsLog:
  """Appends one JSON object per line to RUN/metrics.jsonl and mirrors scalars to TensorBoard.

  Only the first process of a multi-host job writes; the others' calls do nothing.
  """

  def __init__(self, workdir: Path, resume_step: int):
    from tensorboardX import SummaryWriter

    self.primary = jax.process_index() == 0
    if self.primary:
      self.path = rundir.metrics_file(workdir)
      rewind(self.path, resume_step)
      self.file = self.path.open("a")
      self.writer = SummaryWriter(str(rundir.tensorboard_dir(workdir)))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.primary:
      return
    try:
      self.file.write(json.dumps({"step": step, **metrics}) + "\n")
      self.file.flush()
    except OSError as error:
      raise UserError(f"could not write {self.path}: {error.strerror}: free space or make the run folder "
                      "writable; the last checkpoint is intact") from None
    for key, value in metrics.items():
      self.writer.add_scalar(key, value, step)

  def close(self) -> None:
    if self.primary:
      self.file.close()
      self.writer.close()


def rewind(path: Path, step: int) -> None:
  """Keeps the metrics lines up to `step`, the checkpoint a run resumes from: the steps after it will be
  logged again, and a last line cut short by a kill goes too. The file is replaced atomically.
  """
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines(keepends=True):
    try:
      logged_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue
    if line.endswith("\n") and logged_step <= step:
      kept.append(line)
  atomic.write_text(path, "".join(kept))


def check_finite(step_metrics: Mapping[str, Any]) -> None:
  """Raises NonFiniteLoss naming the first step and the loss that became NaN or Inf."""
  bad = {name: int(step_metrics[f"first_nonfinite_{name}"]) for name in HEADS}
  bad = {name: step for name, step in bad.items() if step >= 0}
  if bad:
    name, step = min(bad.items(), key=lambda item: item[1])
    raise NonFiniteLoss(f"the {name} loss became NaN or Inf at step {step}; the last good checkpoint is kept. "
                        f"Lower train.optimizers.{name}.learning_rate or set train.optimizers.{name}.clip_norm.")


def train_metrics(totals: Mapping[str, Any], schedules: Mapping[str, optax.Schedule], step: int,
                  seconds: float, batch_events: int) -> dict[str, float]:
  """The logged training metrics over the steps since the last log."""
  steps = max(float(totals["steps"]), 1.0)
  metrics = {f"train/{k}": v for k, v in summarize(totals).items() if k != "events"}
  metrics.update({f"train/loss_{k}": float(totals[f"loss_{k}"]) / steps for k in HEADS})
  metrics.update({f"train/learning_rate_{k}": float(s(step)) for k, s in schedules.items()})
  metrics["train/step_time_s"] = seconds / steps
  metrics["train/events_per_s"] = batch_events * steps / max(seconds, 1e-9)
  return metrics


def restore_latest(manager: Any, trainer: Trainer, train_iter: Any) -> tuple[TrainState, int]:
  """The latest checkpoint's state and step, with the data iterator moved to the saved position."""
  start = manager.latest_step()
  if start is None:
    return trainer.initial_state, 0
  state, data_state = checkpointing.restore(manager, start, checkpointing.abstract(trainer.initial_state))
  if data_state is not None:
    try:
      train_iter.set_state(data_state)
    except (KeyError, ValueError, TypeError, IndexError) as error:
      raise UserError(f"the data position saved at step {start} does not fit this pipeline ({error}): "
                      "resume with the data.workers the run was saved with") from None
  return state, start


def with_release_threshold(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `sample.release_threshold` set, if unset, to half the mean onset velocity of the
  training split: the velocity head predicts P(onset) x that mean, so below half of it a release is
  the likelier event. Only regression heads need it: distribution heads draw releases as a velocity class.
  """
  if config.sample.release_threshold is not None or config.model.heads != "regression":
    return config
  velocity = np.asarray(store.open_split(config.data.dir, "train").events.velocity)
  threshold = 0.5 * float(velocity[velocity > 0].mean())
  return apply_overrides(config, [f"sample.release_threshold={threshold:.3f}"])


def sounding_counts(pitch: np.ndarray, velocity: np.ndarray, piece: np.ndarray) -> np.ndarray:
  """The notes sounding after each event of event streams laid end to end (`piece`: each event's stream, in
  order), each starting in silence: a pitch sounds from an onset to its next release (as `models.held_pitches`)."""
  onset = velocity > 0
  order = np.lexsort((np.arange(len(pitch)), pitch, piece))  # Each stream's pitches, each pitch's events in order.
  same_pitch = (pitch[order][1:] == pitch[order][:-1]) & (piece[order][1:] == piece[order][:-1])
  sounded_before = np.zeros(len(pitch), bool)
  sounded_before[order[1:]] = same_pitch & onset[order][:-1]
  change = np.cumsum(onset.astype(np.int64) - sounded_before)
  starts = np.flatnonzero(np.r_[True, piece[1:] != piece[:-1]])
  return change - np.repeat(np.r_[0, change[starts[1:] - 1]], np.diff(np.r_[starts, len(pitch)]))


def piece_controls(split: store.EventStore) -> dict[str, np.ndarray]:
  """Each control measured over each whole piece of `split` with music in it, as `models.window_controls` measures
  a window, in its units: notes per second (`density`), notes sounding at once (`polyphony`)."""
  events = split.events
  piece = np.repeat(np.arange(split.num_pieces), split.lengths)
  per_piece = lambda values, index=piece: np.bincount(index, values, minlength=split.num_pieces)
  dt = np.asarray(events.dt, np.float64)
  counts = sounding_counts(np.asarray(events.pitch), np.asarray(events.velocity), piece)
  # The notes sounding after an event, for the next event's dt of the same piece.
  gap_dt, gap_counts = np.where(piece[1:] == piece[:-1], dt[1:], 0.0), counts[:-1]
  gap_sum = lambda values: per_piece(values, piece[:-1])
  seconds, sounding_seconds = per_piece(dt), gap_sum(np.where(gap_counts > 0, gap_dt, 0.0))
  keep = (seconds > 0) & (sounding_seconds > 0)
  return {"density": per_piece(np.asarray(events.velocity) > 0)[keep] / seconds[keep],
          "polyphony": gap_sum(gap_counts * gap_dt)[keep] / sounding_seconds[keep]}


def with_control_quantiles(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `sample.<control>_quantiles` set, for each control the model reads and that is unset, to the
  training pieces' values (`piece_controls`) at CONTROL_QUANTILES evenly spaced quantiles: generation draws each
  file's controls from them, so that a set of files is as varied in tempo and texture as the pieces are."""
  names = [name for name in models.controls_of(config.model) if not config.sample.get(f"{name}_quantiles")]
  if not names:
    return config
  values = piece_controls(store.open_split(config.data.dir, "train"))
  quantiles = {name: np.quantile(values[name], np.linspace(0.0, 1.0, CONTROL_QUANTILES)) for name in names}
  return apply_overrides(config, [f"sample.{name}_quantiles=({', '.join(f'{q:.4g}' for q in points)},)"
                                  for name, points in quantiles.items()])


def progress_bar(total: int, step: int, enabled: bool) -> Any:
  """The training bar, counting steps from `step`; without a total (nor an ETA) for a run trained until
  stopped. It says `compiling` until `restart_clock` is called after the first execution.
  """
  from tqdm import tqdm

  return tqdm(total=None if total >= UNTIL_STOPPED else total, initial=step, disable=not enabled, unit="step",
              desc="training steps (compiling)", smoothing=0, dynamic_ncols=True)


def restart_clock(bar: Any, step: int) -> None:
  """Restarts the bar's clock at `step`: its rate and ETA then come from this session's steps after the first
  execution alone, not from the time spent compiling it (which made a 30 s run open with an ETA of hours).
  """
  bar.initial = bar.n = bar.last_print_n = step  # The first execution's steps are shown but not timed.
  bar.unpause()  # Moves the bar's start past the time since it was drawn: compiling is no step's time.
  bar.set_description_str("training steps")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       progress: bool = True, stop: Callable[[int], bool] | None = None,
                       samples: SampleHook | None = None) -> TrainState:
  """Trains to `config.train.steps`, resuming from the run's latest checkpoint, saving on stop signals.

  Steps run `Trainer.steps_per_execution` at a time; a stop signal, or `stop(step)` (for tests and the menu) turning
  true, ends the run with a save after the execution under way. Every `train.sample_every` steps, `samples`
  (if given) writes samples of the current parameters.

  The whole config is validated, and the run folder checked for writing, before anything is written: a
  start that fails on a user mistake leaves the run folder as it was (its config.json included).
  """
  config_checks.check(config)
  paths.check_writable(workdir, "run folder")
  if config.mesh.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  workdir = Path(workdir)
  data_dir = config.data.dir
  if not store.has_split(data_dir, "train"):
    raise UserError(f"no prepared training data at {data_dir or '(data.dir unset)'}: "
                    "run `musicgen prepare SOURCE --out DIR` and pass --data DIR")
  config = with_control_quantiles(with_release_threshold(config))
  trainer = Trainer(config)  # Checks the devices against the config.
  workdir.mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as resources:
    resources.enter_context(run_lock(workdir))
    manager = resources.enter_context(
        checkpointing.closing(checkpointing.checkpoint_manager(workdir, config.train.keep_checkpoints)))
    train_iter = input_pipeline.train_iterator(config, data_dir, shard_index=jax.process_index(),
                                              shard_count=jax.process_count())
    resources.callback(train_iter.close)
    eval_batches = input_pipeline.eval_batches(config, data_dir) if store.has_split(data_dir, "validation") else []
    state, step = restore_latest(manager, trainer, train_iter)
    save_config(config, workdir)
    schedules = optimizers.schedules(config)
    log = MetricsLog(workdir, step)
    resources.callback(log.close)
    batch_events = config.train.batch_size * config.data.window
    stop_request = resources.enter_context(StopRequest())
    bar = resources.enter_context(progress_bar(config.train.steps, step, progress))
    metrics, tick, compiled = trainer.zero_metrics(), time.perf_counter(), False
    while step < config.train.steps:
      batches = trainer.shard_batches([next(train_iter) for _ in range(trainer.steps_per_execution)])
      state, metrics = trainer.train_steps(state, metrics, batches)
      step += trainer.steps_per_execution
      if compiled:
        bar.update(trainer.steps_per_execution)
      else:
        jax.block_until_ready(state.step)
        restart_clock(bar, step)
        compiled = True
      last = step == config.train.steps or stop_request.requested or (stop is not None and stop(step))
      if step % config.train.log_every == 0 or last:
        totals = jax.device_get(metrics)
        check_finite(totals)
        logged = train_metrics(totals, schedules, step, time.perf_counter() - tick, batch_events)
        log.write(step, logged)
        bar.set_postfix(loss=f"{logged['train/loss_pitch']:.3f}")
        metrics, tick = trainer.zero_metrics(), time.perf_counter()
      eval_metrics = None
      if eval_batches and (step % config.train.eval_every == 0 or last):
        eval_metrics = trainer.evaluate(state.params, eval_batches)
        log.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
      if step % config.train.checkpoint_every == 0 or last:
        if step % config.train.log_every != 0 and not last:
          check_finite(jax.device_get(metrics))
        checkpointing.save(manager, step, state, train_iter.get_state(), eval_metrics)
      if samples and config.train.sample_every and step % config.train.sample_every == 0 and log.primary:
        samples(workdir, trainer.graphdef, state.params, config, step, log.writer,
                num=config.train.sample_count, length=config.train.sample_length)
      if last:
        break
  return state

