"""Backprop isolation: which losses reach which parameters, and which optimizer moves them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicgen_jax import losses, optimizers, steps
from musicgen_jax.config import apply_overrides, load_config
from tests.test_models import random_inputs

TRUNK = ("embed", "lstm")


def tiny_config(*overrides: str):
  return apply_overrides(load_config("tiny"), ("model.dropout=0.0", *overrides))


def random_batch(config, seed: int = 0) -> dict:
  b, t = config.train.batch_size, config.data.window
  rng = np.random.default_rng(seed)
  held = np.where(rng.random((b, 128)) < 0.1, rng.exponential(0.5, (b, 128)), -1.0).astype(np.float32)
  return {"inputs": random_inputs(b, t, seed), "targets": random_inputs(b, t, seed + 1), "held": held}


def side_loss_grads(isolation: str, heads: str, *overrides: str) -> nnx.State:
  """Gradients of the time + velocity losses with respect to every parameter."""
  config = tiny_config(f"train.isolation={isolation}", f"model.heads={heads}", *overrides)
  graphdef, state = steps.create_train_state(config)
  batch = random_batch(config)

  def side_loss(params):
    model = nnx.merge(graphdef, params)
    outputs, _ = model(batch["inputs"], targets=batch["targets"], held=batch["held"],
                       isolate_heads=isolation == "strict")
    sums = losses.event_sums(outputs, batch["targets"], jnp.ones(config.data.window), model.time_bins)
    head_losses = losses.losses_from_sums(sums)
    return head_losses["time"] + head_losses["velocity"]

  return jax.jit(jax.grad(side_loss))(state.params)  # One compile; op by op took most of the time.


def leaves_under(tree, prefixes):
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if optimizers.label_of_path(path[:1]) == "pitch" and str(path[0].key) in prefixes]


def test_labels_partition_the_parameters():
  _, state = steps.create_train_state(tiny_config())
  labels = {str(path[0].key): label
            for path, label in jax.tree_util.tree_leaves_with_path(optimizers.param_labels(state.params))}
  assert labels == {"embed": "pitch", "lstm": "pitch", "pitch_head": "pitch",
                    "time_head": "time", "velocity_head": "velocity"}


@pytest.mark.parametrize("heads, overrides", [("regression", ()), ("distribution", ()),
                                             ("distribution", ("model.time_mixture=4",))])
def test_strict_isolation_keeps_side_losses_out_of_the_trunk(heads, overrides):
  grads = side_loss_grads("strict", heads, *overrides)
  trunk = leaves_under(grads, TRUNK + ("pitch_head",))
  assert trunk and all(np.all(np.asarray(g) == 0) for g in trunk)
  for head in ("time_head", "velocity_head"):
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads[head]))


@pytest.mark.parametrize("heads", ["regression", "distribution"])
def test_joint_training_lets_side_losses_reach_the_trunk(heads):
  grads = side_loss_grads("joint", heads)
  assert all(np.any(np.asarray(g) != 0) for g in leaves_under(grads, TRUNK))


@pytest.mark.parametrize("isolation", ["strict", "joint"])
def test_zero_pitch_learning_rate_leaves_the_trunk_bit_identical(isolation):
  config = tiny_config(f"train.isolation={isolation}", "train.optimizers.pitch.learning_rate=0.0",
                       "train.optimizers.pitch.decay=constant", "train.optimizers.pitch.warmup_steps=0",
                       "train.optimizers.time.warmup_steps=0")
  trainer = steps.Trainer(config)
  before = jax.tree.map(np.array, trainer.initial_state.params)
  state, _ = trainer.train_step(trainer.initial_state, losses.zero_metrics(config.model.heads), random_batch(config))
  for name in ("embed", "lstm", "pitch_head"):
    for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(state.params[name])):
      np.testing.assert_array_equal(a, np.asarray(b))
  changed = [not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(before["time_head"]), jax.tree.leaves(state.params["time_head"]))]
  assert any(changed)


def test_schedules_follow_the_config():
  config = tiny_config("train.optimizers.time.decay=exponential", "train.optimizers.time.decay_rate=0.5",
                       "train.optimizers.time.decay_steps=10", "train.optimizers.time.warmup_steps=0")
  schedules = optimizers.schedules(config)
  assert float(schedules["time"](0)) == pytest.approx(3e-3)
  assert float(schedules["time"](10)) == pytest.approx(1.5e-3)
  assert float(schedules["pitch"](0)) == 0.0
  assert float(schedules["pitch"](20)) == pytest.approx(3e-3, rel=1e-3)
