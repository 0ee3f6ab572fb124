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


# Each decay after the warm-up, from an optimizer's config and the run's total steps.
DECAYS: dict[str, Callable[[ml_collections.ConfigDict, int], optax.Schedule]] = {
    "constant": lambda opt, total_steps: optax.constant_schedule(opt.learning_rate),
    "cosine": lambda opt, total_steps: optax.cosine_decay_schedule(opt.learning_rate,
                                                                   max(total_steps - opt.warmup_steps, 1)),
    "exponential": lambda opt, total_steps: optax.exponential_decay(opt.learning_rate, opt.decay_steps,
                                                                    opt.decay_rate, staircase=True),
}
# Each optimizer, from its config and its learning-rate schedule.
OPTIMIZERS: dict[str, Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]] = {
    "adam": lambda opt, schedule: optax.adam(schedule),
    "adamw": lambda opt, schedule: optax.adamw(schedule, weight_decay=opt.weight_decay),
    "sgd": lambda opt, schedule: optax.sgd(schedule, momentum=0.9),
}


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant, cosine to zero at `total_steps`, or exponential.

  The schedule is a function of the step and `total_steps` alone: a run resumed with a larger `train.steps`
  continues from its step on the schedule of the new total (a cosine is stretched to end at the new total).
  """
  decayed = DECAYS[opt.decay](opt, total_steps)
  if opt.warmup_steps <= 0:
    return decayed
  warmup = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
  return optax.join_schedules([warmup, decayed], [opt.warmup_steps])


def _single_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
  return optax.chain(*clip, OPTIMIZERS[opt.name](opt, schedule))


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
