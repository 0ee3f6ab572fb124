"""The three isolated optimizers: one per head, partitioned over the parameter tree with optax.

Label `pitch` owns the embedding, the LSTM and the pitch head; `time` and `velocity` own only their
heads. Each label gets its own optimizer, schedule and clipping from `config.train.optimizers`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from musicgen_jax.losses import HEADS

LABELS = HEADS  # One optimizer per head, named after it.
HEAD_OF_LABEL = {"time": "time_head", "velocity": "velocity_head"}


def label_of_path(path: tuple[Any, ...]) -> str:
  """The optimizer that owns the parameter at `path`: its head's label, else `pitch` (the trunk)."""
  names = {str(getattr(key, "key", getattr(key, "name", key))) for key in path}
  for label, head in HEAD_OF_LABEL.items():
    if head in names:
      return label
  return "pitch"


def param_labels(params: Any) -> Any:
  """A tree like `params` holding each leaf's optimizer label."""
  return jax.tree_util.tree_map_with_path(lambda path, _: label_of_path(path), params)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant, cosine to zero at `total_steps`, or exponential."""
  if opt.decay == "constant":
    decayed = optax.constant_schedule(opt.learning_rate)
  elif opt.decay == "cosine":
    decayed = optax.cosine_decay_schedule(opt.learning_rate, max(total_steps - opt.warmup_steps, 1))
  elif opt.decay == "exponential":
    decayed = optax.exponential_decay(opt.learning_rate, opt.decay_steps, opt.decay_rate, staircase=True)
  else:
    raise ValueError(f"unknown decay {opt.decay!r}: use constant, cosine or exponential")
  if opt.warmup_steps <= 0:
    return decayed
  warmup = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
  return optax.join_schedules([warmup, decayed], [opt.warmup_steps])


def _single_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  makers: dict[str, Callable[[], optax.GradientTransformation]] = {
      "adam": lambda: optax.adam(schedule),
      "adamw": lambda: optax.adamw(schedule, weight_decay=opt.weight_decay),
      "sgd": lambda: optax.sgd(schedule, momentum=0.9),
  }
  if opt.name not in makers:
    raise ValueError(f"unknown optimizer {opt.name!r}: use one of {sorted(makers)}")
  clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
  return optax.chain(*clip, makers[opt.name]())


def schedules(config: ml_collections.ConfigDict) -> dict[str, optax.Schedule]:
  """The learning-rate schedule of each label, for the optimizers and for logging."""
  return {label: learning_rate_schedule(config.train.optimizers[label], config.train.steps)
          for label in LABELS}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`optax.multi_transform` of the three per-label optimizers over the model's parameters."""
  label_schedules = schedules(config)
  transforms = {label: _single_optimizer(config.train.optimizers[label], label_schedules[label])
                for label in LABELS}
  return optax.multi_transform(transforms, param_labels)
