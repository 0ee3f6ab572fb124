"""Training: a pure jitted `train_step` over a pytree `TrainState`, evaluation, and the resumable loop."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from musicgen_jax import checkpointing, cudnn_lstm, distributions, input_pipeline, models, optimizers, store
from musicgen_jax.config import apply_overrides, read_config, save_config
from musicgen_jax.errors import UserError
from musicgen_jax.runlock import run_lock

LOSSES = ("pitch", "time", "velocity")
ISOLATION_MODES = ("strict", "joint")
METRICS_FILE = "metrics.jsonl"


class NonFiniteLoss(RuntimeError):
  """A loss became NaN or Inf; the state of that step is never saved."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: parameters, the three optimizers' state, the step and the dropout key."""

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def create_train_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, TrainState]:
  """The model's graph definition (static) and a fresh train state, all from `config.seed`."""
  model = models.MusicLSTM(config.model, rngs=nnx.Rngs(params=config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = optimizers.make_optimizer(config).init(params)
  rng = jax.random.PRNGKey(config.seed + 1)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state, rng)


def position_weights(window: int, predict_last: int) -> jax.Array:
  """Which positions of a window are scored: all, or only the last `predict_last` as the original."""
  positions = jnp.arange(window)
  return (positions >= window - predict_last if predict_last > 0 else positions >= 0).astype(jnp.float32)


def event_sums(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
               weights: jax.Array, time_bins: distributions.TimeBins | None = None) -> dict[str, jax.Array]:
  """Weighted per-event sums of every loss and metric, so batches and hosts add up exactly.

  Regression heads (`dt`, `velocity` outputs) sum their L1 and squared errors; distribution heads
  (`time_logits`, `velocity_logits`, which need `time_bins`) the NLL of each sub-event's class.
  """
  target_pitch = targets["pitch"].astype(jnp.int32)
  nll = distributions.class_nll(outputs["pitch_logits"], target_pitch)
  correct = (jnp.argmax(outputs["pitch_logits"], axis=-1) == target_pitch).astype(jnp.float32)
  weighted = lambda x: jnp.sum(x * weights)
  sums = {"events": jnp.sum(weights * jnp.ones_like(nll)), "pitch_nll": weighted(nll),
          "pitch_correct": weighted(correct)}
  if "time_logits" in outputs:
    target = distributions.classes(targets, time_bins)
    sums["time_nll"] = weighted(distributions.class_nll(outputs["time_logits"], target["time"]))
    sums["velocity_nll"] = weighted(distributions.class_nll(outputs["velocity_logits"], target["velocity"]))
    sums["seconds"] = weighted(targets["dt"])
  else:
    sums["dt_abs_error"] = weighted(jnp.abs(outputs["dt"] - targets["dt"]))
    sums["velocity_sq_error"] = weighted(jnp.square(outputs["velocity"] - targets["velocity"] / models.MAX_VELOCITY))
  return sums


def losses_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The three training losses (means per scored event) from `event_sums`."""
  events = jnp.maximum(sums["events"], 1.0)
  if "time_nll" in sums:
    return {name: sums[f"{name}_nll"] / events for name in LOSSES}
  return {"pitch": sums["pitch_nll"] / events, "time": sums["dt_abs_error"] / events,
          "velocity": sums["velocity_sq_error"] / events}


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Readable metrics from summed counts: NLLs in nats/event and accuracy; for regression heads dt MAE in ms
  and velocity RMSE in MIDI units, for distribution heads the total NLL, also in bits per note (two events
  a note) and bits per second of music."""
  events = max(float(sums["events"]), 1.0)
  metrics = {"pitch_nll": float(sums["pitch_nll"]) / events,
             "pitch_accuracy": float(sums["pitch_correct"]) / events}
  if "dt_abs_error" in sums:
    metrics["dt_mae_ms"] = 1000.0 * float(sums["dt_abs_error"]) / events
    metrics["velocity_rmse"] = models.MAX_VELOCITY * math.sqrt(float(sums["velocity_sq_error"]) / events)
  if "time_nll" in sums:
    metrics.update(likelihood_metrics(float(sums["pitch_nll"]), float(sums["time_nll"]),
                                      float(sums["velocity_nll"]), events, float(sums["seconds"])))
  metrics["events"] = int(round(float(sums["events"])))
  return metrics


def likelihood_metrics(pitch_nll: float, time_nll: float, velocity_nll: float, events: float,
                       seconds: float) -> dict[str, float]:
  """Per-component and total NLL in nats/event from summed nats, and the total in bits per note and bits
  per second of music."""
  total = pitch_nll + time_nll + velocity_nll
  return {"time_nll": time_nll / events, "velocity_nll": velocity_nll / events, "total_nll": total / events,
          "bits_per_note": 2.0 * total / events / math.log(2.0),
          "bits_per_second": total / math.log(2.0) / max(seconds, 1e-9)}


def zero_metrics(head_mode: str) -> dict[str, jax.Array]:
  """The empty on-device accumulator that `train_step` adds each step's sums into, for `model.heads`."""
  keys = ("time_nll", "velocity_nll", "seconds") if head_mode == "distribution" else ("dt_abs_error",
                                                                                       "velocity_sq_error")
  sums = {k: jnp.zeros((), jnp.float32) for k in ("events", "pitch_nll", "pitch_correct", *keys, "steps")}
  sums.update({f"loss_{k}": jnp.zeros((), jnp.float32) for k in LOSSES})
  sums.update({f"first_nonfinite_{k}": jnp.full((), -1, jnp.int32) for k in LOSSES})
  return sums


def train_step(state: TrainState, metrics: dict[str, jax.Array], batch: Mapping[str, Any], *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation, isolate_heads: bool,
               weights: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update of all three optimizers from one batch; metrics accumulate on the device."""
  dropout_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params: nnx.State) -> tuple[jax.Array, tuple[dict, dict]]:
    model = nnx.merge(graphdef, params)
    outputs, _ = model(batch["inputs"], targets=batch["targets"], isolate_heads=isolate_heads,
                       rngs=nnx.Rngs(dropout=dropout_key))
    sums = event_sums(outputs, batch["targets"], weights, model.time_bins)
    losses = losses_from_sums(sums)
    return sum(losses.values()), (sums, losses)

  grads, (sums, losses) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_metrics = {k: metrics[k] + sums[k] for k in sums}
  new_metrics["steps"] = metrics["steps"] + 1
  for name, loss in losses.items():
    new_metrics[f"loss_{name}"] = metrics[f"loss_{name}"] + loss
    first = metrics[f"first_nonfinite_{name}"]
    new_metrics[f"first_nonfinite_{name}"] = jnp.where((first < 0) & ~jnp.isfinite(loss), state.step + 1, first)
  return TrainState(state.step + 1, params, opt_state, state.rng), new_metrics


def train_steps(state: TrainState, metrics: dict[str, jax.Array], batches: Mapping[str, Any],
                **step_args: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` over each of `batches` (stacked on a leading axis) in one compiled loop: several steps
  per execution, whose temporary buffers are set up once (on a CPU, fresh pages for every execution
  cost more than a tenth of a step) and whose dispatch the host pays once."""

  def step(carry: tuple[TrainState, dict[str, jax.Array]], batch: Mapping[str, Any]) -> tuple[tuple, None]:
    return train_step(*carry, batch, **step_args), None

  return jax.lax.scan(step, (state, metrics), batches)[0]


def execution_steps(train_config: ml_collections.ConfigDict) -> int:
  """Steps per compiled execution: `train.steps_per_execution`, reduced to divide every cadence of the
  loop (log, evaluation, checkpoint, samples, the last step), so that each falls on an execution's last
  step and a resumed run repeats the executions of an uninterrupted one."""
  if train_config.steps_per_execution < 1:
    raise UserError(f"train.steps_per_execution must be at least 1, not {train_config.steps_per_execution}")
  cadences = (train_config.steps, train_config.log_every, train_config.eval_every, train_config.checkpoint_every,
              train_config.sample_every)
  return math.gcd(train_config.steps_per_execution, *(c for c in cadences if c > 0))


def eval_step(params: nnx.State, batch: Mapping[str, Any], *, graphdef: nnx.GraphDef,
              weights: jax.Array) -> dict[str, jax.Array]:
  """Summed metrics of one evaluation batch, padding rows masked out."""
  model = nnx.merge(graphdef, params)
  outputs, _ = model(batch["inputs"], targets=batch["targets"])
  return event_sums(outputs, batch["targets"], weights[None, :] * batch["mask"][:, None], model.time_bins)


def data_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A one-axis `data` mesh over `mesh.data` devices (0: all), across every host of the job."""
  devices = jax.devices()
  count = config.mesh.data or len(devices)
  if not 0 < count <= len(devices):
    raise UserError(f"mesh.data={config.mesh.data} but {len(devices)} devices are visible")
  if config.train.batch_size % count:
    raise UserError(f"train.batch_size {config.train.batch_size} does not split over {count} devices: "
                    "make it a multiple of mesh.data")
  return Mesh(np.asarray(devices[:count]), ("data",))


class Trainer:
  """The compiled steps of one config on its device mesh: parameters and optimizer state replicated,
  batches sharded along `data`, gradients reduced by XLA.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    if config.train.isolation not in ISOLATION_MODES:
      raise UserError(f"train.isolation must be one of {ISOLATION_MODES}, not {config.train.isolation!r}")
    if not 0 <= config.train.predict_last <= config.data.window:
      raise UserError(f"train.predict_last must be between 0 and data.window ({config.data.window})")
    self.config = config
    self.steps_per_execution = execution_steps(config.train)
    self.mesh = data_mesh(config)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    self.stacked_sharding = NamedSharding(self.mesh, PartitionSpec(None, "data"))
    self.graphdef, initial_state = create_train_state(config)
    self.initial_state = jax.device_put(initial_state, self.replicated)
    self.tx = optimizers.make_optimizer(config)
    weights = position_weights(config.data.window, config.train.predict_last)
    step_args = dict(graphdef=self.graphdef, tx=self.tx, isolate_heads=config.train.isolation == "strict",
                     weights=weights)

    def compiled(fn: Callable[..., Any], batch_sharding: NamedSharding) -> Any:
      return jax.jit(functools.partial(fn, **step_args),
                     in_shardings=(self.replicated, self.replicated, batch_sharding),
                     out_shardings=(self.replicated, self.replicated), donate_argnums=(0, 1))

    self.train_step = compiled(train_step, self.batch_sharding)
    self.train_steps = compiled(train_steps, self.stacked_sharding)
    self.eval_step = jax.jit(functools.partial(eval_step, graphdef=self.graphdef, weights=weights),
                             in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated)

  def zero_metrics(self) -> dict[str, jax.Array]:
    return jax.device_put(zero_metrics(self.config.model.heads), self.replicated)

  def shard_batch(self, local_batch: Mapping[str, Any], sharding: NamedSharding | None = None) -> Any:
    """Assembles this host's rows of a batch into global arrays sharded along `data`."""
    sharding = sharding or self.batch_sharding
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)

  def shard_batches(self, local_batches: list[Mapping[str, Any]]) -> Any:
    """`shard_batch` of several batches stacked on a new leading axis, the input of `train_steps`."""
    return self.shard_batch(jax.tree.map(lambda *rows: np.stack(rows), *local_batches), self.stacked_sharding)

  def host_rows(self, global_batch: Mapping[str, Any]) -> Any:
    """This host's share of a batch that every host holds whole (the fixed evaluation batches)."""
    count, index = jax.process_count(), jax.process_index()
    return jax.tree.map(lambda x: np.array_split(np.asarray(x), count)[index], global_batch)

  def evaluate(self, params: nnx.State, batches: list[Mapping[str, Any]]) -> dict[str, float]:
    """Exact metrics over a fixed list of evaluation batches (each whole, as every host holds them)."""
    totals = None
    for batch in batches:
      sums = self.eval_step(params, self.shard_batch(self.host_rows(batch)))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return summarize(jax.device_get(totals))


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
      self.path = workdir / METRICS_FILE
      rewind(self.path, resume_step)
      self.file = self.path.open("a")
      self.writer = SummaryWriter(str(workdir / "tensorboard"))

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
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(kept))
  os.replace(tmp, path)


def check_finite(step_metrics: Mapping[str, Any]) -> None:
  """Raises NonFiniteLoss naming the first step and the loss that became NaN or Inf."""
  bad = {name: int(step_metrics[f"first_nonfinite_{name}"]) for name in LOSSES}
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
  metrics.update({f"train/loss_{k}": float(totals[f"loss_{k}"]) / steps for k in LOSSES})
  metrics.update({f"train/learning_rate_{k}": float(s(step)) for k, s in schedules.items()})
  metrics["train/step_time_s"] = seconds / steps
  metrics["train/events_per_s"] = batch_events * steps / max(seconds, 1e-9)
  return metrics


def abstract_state(state: TrainState) -> TrainState:
  """Shapes and dtypes of a train state, the target a checkpoint restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_latest(manager: Any, trainer: Trainer, train_iter: Any) -> tuple[TrainState, int]:
  """The latest checkpoint's state and step, with the data iterator moved to the saved position."""
  start = manager.latest_step()
  if start is None:
    return trainer.initial_state, 0
  state, data_state = checkpointing.restore(manager, start, abstract_state(trainer.initial_state))
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       progress: bool = True, stop: Callable[[int], bool] | None = None) -> TrainState:
  """Trains to `config.train.steps`, resuming from the run's latest checkpoint, saving on stop signals.

  Steps run `Trainer.steps_per_execution` at a time; a stop signal, or `stop(step)` (for tests and the menu) turning
  true, ends the run with a save after the execution under way.
  """
  from tqdm import tqdm

  if config.mesh.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  workdir = Path(workdir)
  data_dir = config.data.dir
  if not store.has_split(data_dir, "train"):
    raise UserError(f"no prepared training data at {data_dir or '(data.dir unset)'}: "
                    "run `musicgen prepare SOURCE --out DIR` and pass --data DIR")
  config = with_release_threshold(config)
  workdir.mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as resources:
    resources.enter_context(run_lock(workdir))
    trainer = Trainer(config)
    save_config(config, workdir)
    manager = resources.enter_context(
        checkpointing.closing(checkpointing.checkpoint_manager(workdir, config.train.keep_checkpoints)))
    train_iter = input_pipeline.train_iterator(config, data_dir, shard_index=jax.process_index(),
                                              shard_count=jax.process_count())
    resources.callback(train_iter.close)
    eval_batches = input_pipeline.eval_batches(config, data_dir) if store.has_split(data_dir, "validation") else []
    state, step = restore_latest(manager, trainer, train_iter)
    schedules = optimizers.schedules(config)
    log = MetricsLog(workdir, step)
    resources.callback(log.close)
    batch_events = config.train.batch_size * config.data.window
    stop_request = resources.enter_context(StopRequest())
    bar = resources.enter_context(tqdm(total=config.train.steps, initial=step, disable=not progress, unit="step",
                                       dynamic_ncols=True))
    metrics, tick = trainer.zero_metrics(), time.perf_counter()
    while step < config.train.steps:
      batches = trainer.shard_batches([next(train_iter) for _ in range(trainer.steps_per_execution)])
      state, metrics = trainer.train_steps(state, metrics, batches)
      step += trainer.steps_per_execution
      bar.update(trainer.steps_per_execution)
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
      if config.train.sample_every and step % config.train.sample_every == 0 and log.primary:
        from musicgen_jax import plots

        plots.log_samples(workdir, trainer.graphdef, state.params, config, step, log.writer,
                          num=config.train.sample_count, length=config.train.sample_length)
      if last:
        break
  return state


class LoadedRun(NamedTuple):
  """A trained run ready for inference: its saved config, the model's graph and parameters, the step."""

  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: nnx.State
  step: int


def load_run(workdir: str | os.PathLike, checkpoint: str | int = "latest") -> LoadedRun:
  """Loads a run folder's config and the parameters of one checkpoint (`latest`, `best` or a step)."""
  if not Path(workdir).is_dir():
    raise UserError(f"run folder {workdir} does not exist: train one with `musicgen train --workdir {workdir}`")
  config = read_config(workdir)
  if config.model.get("recurrence") == "cudnn" and not cudnn_lstm.platform():
    # The recurrence changes no parameter: a run trained with cuDNN generates and evaluates anywhere.
    config = apply_overrides(config, ["model.recurrence=auto"])
  manager = checkpointing.checkpoint_manager(workdir, read_only=True)
  try:
    step = checkpointing.resolve_step(manager, checkpoint)
    graphdef, initial = create_train_state(config)
    state, _ = checkpointing.restore(manager, step, abstract_state(initial), with_data=False)
  finally:
    manager.close()
  return LoadedRun(config, graphdef, state.params, step)
