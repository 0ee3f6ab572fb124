"""The validation pass: a rule for every key of every bundled config, each bad value one line naming the key,
the value and what is allowed, rules for absent keys skipped."""

import ml_collections
import pytest

from musicgen_jax import config_checks, paths
from musicgen_jax.config import apply_overrides, load_config
from musicgen_jax.errors import UserError


@pytest.mark.parametrize("name", paths.bundled_configs())
def test_every_key_of_every_bundled_config_has_a_rule_and_passes_it(name):
  config = load_config(name)
  keys = [key for key, _ in config_checks.leaves(config)]
  assert keys and not [key for key in keys if key not in config_checks.RULES]
  assert config_checks.problems(config) == []


def with_key(config: ml_collections.ConfigDict, key: str, value) -> ml_collections.ConfigDict:
  """A copy of `config` with one key added or changed past the override's type checks."""
  tree = config.to_dict()
  node = tree
  *groups, leaf = key.split(".")
  for group in groups:
    node = node[group]
  node[leaf] = value
  return ml_collections.ConfigDict(tree)


def without_key(config: ml_collections.ConfigDict, key: str) -> ml_collections.ConfigDict:
  """A copy of `config` without one key, as a config.json saved before the key existed has it."""
  tree = config.to_dict()
  *groups, leaf = key.split(".")
  node = tree
  for group in groups:
    node = node[group]
  del node[leaf]
  return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("key, good, bad, allowed", [
    ("model.recurrence", "cudnn", "fast", "one of 'auto', 'scan', 'fused', 'cudnn'"),
    ("model.heads", "regression", "mixture", "one of 'regression', 'distribution'"),
    ("model.order", ("time", "pitch", "velocity"), ("pitch", "time"),
     "a tuple naming each of 'pitch', 'velocity', 'time' once"),
    ("model.dt_max", 0.5, 0.01, "a number in (model.dt_bin (0.01), 60.0]"),
    ("model.condition", "density+polyphony", "polyphony+density",
     "one of 'none', 'density', 'polyphony', 'density+polyphony'"),
    ("sample.density_quantiles", (2.0, 2.0, 9.5), (3.0, 2.0), "an ascending tuple of numbers above 0"),
    ("sample.polyphony_quantiles", (1.0, 4.5), (0.0, 2.0), "an ascending tuple of numbers above 0"),
])
def test_rules_of_the_newer_keys_and_configs_saved_before_them(key, good, bad, allowed):
  config = load_config("tiny")
  assert not config_checks.problems(without_key(config, key))
  text = lambda value: value if isinstance(value, str) else repr(value)
  assert not config_checks.problems(apply_overrides(config, [f"{key}={text(good)}"]))
  assert config_checks.problems(apply_overrides(config, [f"{key}={text(bad)}"])) == [
      f"bad config value {key}={bad!r}: it must be {allowed}"]


@pytest.mark.parametrize("override, line", [
    ("model.hidden=-5", "bad config value model.hidden=-5: it must be a whole number of at least 1"),
    ("train.batch_size=0", "bad config value train.batch_size=0: it must be a whole number of at least 1"),
    ("model.dropout=1.5", "bad config value model.dropout=1.5: it must be a number in [0, 1)"),
    ("train.optimizers.pitch.name=adamx",
     "bad config value train.optimizers.pitch.name='adamx': it must be one of 'adam', 'adamw', 'sgd'"),
    ("train.optimizers.pitch.decay=linear",
     "bad config value train.optimizers.pitch.decay='linear': it must be one of 'constant', 'cosine', 'exponential'"),
    ("train.predict_last=33",
     "bad config value train.predict_last=33: it must be a whole number from 0 to data.window (32)"),
    ("mesh.data=3", "bad config value train.batch_size=16: it must be a whole number of at least 1, a multiple of "
                    "mesh.data (3)"),
    ("sample.release_threshold=200",
     "bad config value sample.release_threshold=200: it must be unset (None) or a number from 0 to 127"),
    ("train.optimizers.velocity.decay_rate=0.0",
     "bad config value train.optimizers.velocity.decay_rate=0.0: it must be a number in (0, 1]"),
    ("model.head_divisors=(2, 80)",
     "bad config value model.head_divisors=(2, 80): it must be a tuple of whole numbers from 1 to model.hidden (64)"),
])
def test_a_bad_value_is_one_line_naming_the_key_the_value_and_what_is_allowed(override, line):
  assert config_checks.problems(apply_overrides(load_config("tiny"), [override])) == [line]


@pytest.mark.parametrize("key, value", [
    ("model.hidden", 5.5), ("model.hidden", True), ("model.dropout", "0.1"), ("mesh.distributed", 1),
    ("data.dir", 3), ("model.dropout", float("nan")), ("sample.max_dt", float("inf")), ("model.head_divisors", 2),
    ("model.inputs", None),
])
def test_a_value_of_the_wrong_type_is_refused(key, value):
  (line,) = config_checks.problems(with_key(load_config("tiny"), key, value))
  assert line.startswith(f"bad config value {key}={value!r}: it must be")


def test_an_unknown_key_is_refused_and_every_problem_is_its_own_line():
  config = with_key(apply_overrides(load_config("tiny"), ["model.hidden=0"]), "model.hiden", 3)
  with pytest.raises(UserError) as error:
    config_checks.check(config)
  assert str(error.value).splitlines() == [
      "bad config value model.hidden=0: it must be a whole number of at least 1",
      "unknown config key model.hiden: remove it, or see `musicgen config` for the keys"]


def test_bounds_that_name_a_setting_follow_its_value():
  assert not config_checks.problems(apply_overrides(load_config("tiny"), ["data.window=64", "train.predict_last=64"]))
  assert not config_checks.problems(apply_overrides(load_config("tiny"), ["mesh.data=4"]))
