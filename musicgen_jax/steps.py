"""The compiled training machinery: a pure `train_step` over a pytree `TrainState`, several steps per
execution, the evaluation step, and the `Trainer` that places them on a data-parallel device mesh.

It reads no files and imports no input pipeline or checkpointing library, so a benchmark can compile
the real steps with only jax, flax, optax and ml-collections installed.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from musicgen_jax import config_checks, models, optimizers
from musicgen_jax.errors import UserError
from musicgen_jax.losses import event_sums, losses_from_sums, position_weights, summarize, zero_metrics


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


def train_step(state: TrainState, metrics: dict[str, jax.Array], batch: Mapping[str, Any], *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation, isolate_heads: bool,
               weights: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update of all three optimizers from one batch; metrics accumulate on the device."""
  dropout_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params: nnx.State) -> tuple[jax.Array, tuple[dict, dict]]:
    model = nnx.merge(graphdef, params)
    outputs, _ = model(batch["inputs"], targets=batch["targets"], held=batch["held"],
                       isolate_heads=isolate_heads, rngs=nnx.Rngs(dropout=dropout_key), time_major=True)
    sums = event_sums(outputs, models.swap_batch_time(batch["targets"]), weights[:, None], model.time_bins)
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
  cadences = (train_config.steps, train_config.log_every, train_config.eval_every, train_config.checkpoint_every,
              train_config.sample_every)
  return math.gcd(train_config.steps_per_execution, *(c for c in cadences if c > 0))


def eval_step(params: nnx.State, batch: Mapping[str, Any], scales: Mapping[str, jax.Array] | None = None, *,
              graphdef: nnx.GraphDef, weights: jax.Array) -> dict[str, jax.Array]:
  """Summed metrics of one evaluation batch, padding rows masked out; `scales` as in `event_sums`."""
  model = nnx.merge(graphdef, params)
  outputs, _ = model(batch["inputs"], targets=batch["targets"], held=batch["held"], time_major=True)
  return event_sums(outputs, models.swap_batch_time(batch["targets"]), weights[:, None] * batch["mask"][None, :],
                    model.time_bins, scales)


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
    config_checks.check(config)
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
                             in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                             out_shardings=self.replicated)

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

  def evaluate(self, params: nnx.State, batches: list[Mapping[str, Any]], *,
               fit_likelihood: bool = False) -> dict[str, float]:
    """Exact metrics over a fixed list of evaluation batches (each whole, as every host holds them).

    With `fit_likelihood`, regression heads are also scored as distributions on the classes of the
    distribution heads: a Laplace (dt) and a Gaussian (velocity) whose scales are the MAE and the RMSE of
    these batches, the maximum-likelihood fits around the predicted values, in a second pass.
    """
    metrics = self._evaluate(params, batches, None)
    if fit_likelihood and "dt_mae_ms" in metrics:
      scales = {"dt": jnp.float32(max(metrics["dt_mae_ms"] / 1000.0, 1e-6)),
                "velocity": jnp.float32(max(metrics["velocity_rmse"], 1e-3))}
      metrics = {**metrics, **self._evaluate(params, batches, scales)}
    return metrics

  def _evaluate(self, params: nnx.State, batches: list[Mapping[str, Any]],
                scales: Mapping[str, jax.Array] | None) -> dict[str, float]:
    totals = None
    for batch in batches:
      sums = self.eval_step(params, self.shard_batch(self.host_rows(batch)), scales)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return summarize(jax.device_get(totals))
