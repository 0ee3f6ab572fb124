"""One validation pass over a whole config: every key's type, range or allowed names, checked before a run
folder is created or written, so that each bad value is one line naming the key, the value and what is
allowed. Only facts known at run time (the devices visible) are checked later.

To add a key to the configs, add its rule to RULES (tests fail for a bundled config key without one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import ml_collections

from musicgen_jax import distributions, losses, models, optimizers
from musicgen_jax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 2**32 - 1
MAX_STEPS = 2**31 - 1  # The train state counts steps in int32.

Bound = int | float | str | None  # A number, or the key of another setting whose value is the bound.


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key accepts: a `kind` of value (whole, number, name, flag, text, divisors, ascending numbers, or
  an order of all the `names`), within bounds
  [low, high] (either end open with `open_low`/`open_high`), among `names`, or None where `unset` is true.
  """

  kind: str
  low: Bound = None
  high: Bound = None
  open_low: bool = False
  open_high: bool = False
  names: tuple[str, ...] = ()
  unset: bool = False
  multiple_of: str | None = None  # Key of a setting that the value must be a multiple of (when it is not 0).

  def allowed(self, config: ml_collections.ConfigDict) -> str:
    """What the rule allows, in words, with the values of the settings its bounds name."""
    if self.kind == "name":
      words = "one of " + ", ".join(repr(name) for name in self.names)
    elif self.kind == "order":
      words = "a tuple naming each of " + ", ".join(repr(name) for name in self.names) + " once"
    elif self.kind == "flag":
      words = "true or false"
    elif self.kind == "text":
      words = "text"
    else:
      noun = {"whole": "a whole number", "number": "a number", "divisors": "a tuple of whole numbers",
              "ascending": "an ascending tuple of numbers"}[self.kind]
      words = noun + self._range(config)
    if self._divisor(config):
      words += f", a multiple of {self.multiple_of} ({self._divisor(config)})"
    return f"unset (None) or {words}" if self.unset else words

  def _range(self, config: ml_collections.ConfigDict) -> str:
    low, high = (shown(bound, config) for bound in (self.low, self.high))
    if low is not None and high is not None:
      if self.open_low or self.open_high:
        return f" in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
      return f" from {low} to {high}"
    if low is not None:
      return f" above {low}" if self.open_low else f" of at least {low}"
    return ""

  def _divisor(self, config: ml_collections.ConfigDict) -> int:
    """The value of the `multiple_of` setting where it constrains (a whole number above 0), else 0."""
    divisor = resolve(self.multiple_of, config)
    return divisor if isinstance(divisor, int) and not isinstance(divisor, bool) and divisor > 0 else 0

  def refers(self) -> set[str]:
    """The keys of the settings whose values the rule's bounds are."""
    return {bound for bound in (self.low, self.high, self.multiple_of) if isinstance(bound, str)}

  def accepts(self, value: Any, config: ml_collections.ConfigDict) -> bool:
    """Whether `value` is of the rule's kind and within its bounds, as `config` sets them."""
    if value is None:
      return self.unset
    if self.kind == "name":
      return isinstance(value, str) and value in self.names
    if self.kind == "order":
      return (isinstance(value, (tuple, list)) and all(isinstance(item, str) for item in value)
              and sorted(value) == sorted(self.names))
    if self.kind == "flag":
      return isinstance(value, bool)
    if self.kind == "text":
      return isinstance(value, str)
    if self.kind in ("divisors", "ascending"):
      return (isinstance(value, (tuple, list)) and all(self._in_range(item, config) for item in value)
              and (self.kind == "divisors" or all(a <= b for a, b in zip(value, value[1:]))))
    divisor = self._divisor(config)
    return self._in_range(value, config) and not (divisor and value % divisor)

  def _in_range(self, value: Any, config: ml_collections.ConfigDict) -> bool:
    whole = self.kind in ("whole", "divisors")
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not math.isfinite(value):
      return False
    low, high = (resolve(bound, config) for bound in (self.low, self.high))
    return ((low is None or (value > low if self.open_low else value >= low))
            and (high is None or (value < high if self.open_high else value <= high)))


def whole(low: Bound = None, high: Bound = None, **options: Any) -> Rule:
  """An int (never a bool) within [low, high]."""
  return Rule("whole", low, high, **options)


def number(low: Bound = None, high: Bound = None, **options: Any) -> Rule:
  """A finite int or float within [low, high]."""
  return Rule("number", low, high, **options)


def names(allowed: Any) -> Rule:
  """One of the names `allowed` (a tuple, or a dict's keys)."""
  return Rule("name", names=tuple(allowed))


FLAG = Rule("flag")
TEXT = Rule("text")
FRACTION = number(0, 1, open_high=True)
COUNT = whole(1)
OPTIMIZER_RULES = {
    "name": names(optimizers.OPTIMIZERS),
    "learning_rate": number(0),
    "warmup_steps": whole(0),
    "decay": names(optimizers.DECAYS),
    "decay_rate": number(0, 1, open_low=True),
    "decay_steps": COUNT,
    "weight_decay": number(0),
    "clip_norm": number(0),
}
RULES = {
    "seed": whole(0, MAX_SEED),
    "data.dir": TEXT,
    "data.window": COUNT,
    "data.sustain": FLAG,
    "data.workers": whole(0),
    "data.prefetch": COUNT,
    "data.transpose": whole(0, models.NUM_PITCHES - 1),
    "data.time_stretch": FRACTION,
    "data.loudness_stretch": FRACTION,
    "data.eval_windows": COUNT,
    "model.inputs": names(models.INPUT_MODES),
    "model.embed": COUNT,
    "model.hidden": COUNT,
    "model.layers": COUNT,
    "model.head_divisors": Rule("divisors", 1, "model.hidden"),
    "model.dropout": FRACTION,
    "model.dtype": names(DTYPES),
    "model.param_dtype": names(DTYPES),
    "model.recurrence": names(models.RECURRENCES),
    "model.heads": names(models.HEAD_MODES),
    "model.order": Rule("order", names=distributions.SUB_EVENTS),
    "model.dt_bin": number(0.001, 1.0),
    "model.dt_max": number("model.dt_bin", 60.0, open_low=True),
    "model.time_mixture": whole(0, 64),
    "model.condition": names(models.CONDITIONS),
    "train.steps": whole(1, MAX_STEPS),
    "train.batch_size": whole(1, multiple_of="mesh.data"),
    "train.isolation": names(losses.ISOLATION_MODES),
    "train.predict_last": whole(0, "data.window"),
    "train.steps_per_execution": COUNT,
    "train.log_every": COUNT,
    "train.eval_every": COUNT,
    "train.checkpoint_every": COUNT,
    "train.keep_checkpoints": COUNT,
    "train.sample_every": whole(0),
    "train.sample_count": COUNT,
    "train.sample_length": COUNT,
    **{f"train.optimizers.{head}.{key}": rule for head in losses.HEADS for key, rule in OPTIMIZER_RULES.items()},
    "mesh.data": whole(0),
    "mesh.distributed": FLAG,
    "sample.release_threshold": number(0, int(models.MAX_VELOCITY), unset=True),
    "sample.max_dt": number(0, open_low=True),
    "sample.temperature": number(0, open_low=True),
    "sample.top_k": whole(0, models.NUM_PITCHES),
    "sample.top_p": number(0, 1, open_low=True),
    "sample.time_temperature": number(0, open_low=True),
    "sample.velocity_temperature": number(0, open_low=True),
    **{f"sample.{name}_quantiles": Rule("ascending", 0, open_low=True) for name in models.CONTROLS},
}
MISSING = object()


def value_at(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of a dotted key, or MISSING where the config lacks it."""
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return MISSING
    node = node[part]
  return node


def resolve(bound: Bound, config: ml_collections.ConfigDict) -> int | float | None:
  """A bound's number: itself, or the value of the setting it names (None where that is absent or not a number)."""
  if not isinstance(bound, str):
    return bound
  value = value_at(config, bound)
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shown(bound: Bound, config: ml_collections.ConfigDict) -> str | None:
  """A bound as a message shows it: the number, or the setting's key and its value; None for no bound."""
  value = resolve(bound, config)
  if value is None:
    return None
  return f"{bound} ({value})" if isinstance(bound, str) else str(value)


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every setting of a config, groups flattened."""
  for key, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """One line per bad setting: an unknown key, or a value its rule refuses (naming what is allowed). A rule
  for a key the config lacks is not applied, nor one whose bound is a setting that is itself bad.
  """
  values = dict(leaves(config))
  bad = {key for key, value in values.items() if key in RULES and not RULES[key].accepts(value, config)}
  found = []
  for key, value in values.items():
    if key not in RULES:
      found.append(f"unknown config key {key}: remove it, or see `musicgen config` for the keys")
    elif key in bad and not RULES[key].refers() & bad:
      found.append(f"bad config value {key}={value!r}: it must be {RULES[key].allowed(config)}")
  return found


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a UserError with one line per bad setting of `config` (see `problems`)."""
  found = problems(config)
  if found:
    raise UserError("\n".join(found))
