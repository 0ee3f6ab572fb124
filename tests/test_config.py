"""Configs: bundled files load, overrides are typed and checked, a run's config round-trips."""

import pytest

from musicgen_jax import paths
from musicgen_jax.config import apply_overrides, load_config, model_differences, read_config, save_config
from musicgen_jax.errors import UserError

INTERFACE_KEYS = ("seed", "data.window", "train.steps", "train.batch_size", "train.isolation",
                  "train.predict_last", "model.hidden", "model.layers", "model.embed", "model.inputs")


@pytest.mark.parametrize("name", paths.bundled_configs())
def test_bundled_configs_have_the_interface_keys(name):
  config = load_config(name)
  for key in INTERFACE_KEYS:
    node = config
    for part in key.split("."):
      node = node[part]


def test_original_config_matches_the_original_project():
  config = load_config("original")
  assert (config.model.embed, config.data.window, config.train.predict_last, config.train.batch_size) == (8, 256, 4, 4)
  assert config.model.inputs == "pitch"
  assert config.train.optimizers.pitch.learning_rate == 0.002
  assert config.train.optimizers.pitch.decay_rate == 0.9999


def test_overrides_are_typed():
  config = apply_overrides(load_config("tiny"), ["train.steps=7", "model.dropout=0", "model.inputs=pitch",
                                                "data.sustain=false", "model.head_divisors=(2, 8)"])
  assert config.train.steps == 7 and isinstance(config.model.dropout, float)
  assert config.model.inputs == "pitch" and config.data.sustain is False
  assert config.model.head_divisors == (2, 8)


@pytest.mark.parametrize("override", ["train.stepz=5", "modle.hidden=3", "train.steps=many", "nokey",
                                      "train=3", "data.sustain=maybe"])
def test_bad_overrides_are_rejected(override):
  with pytest.raises(UserError):
    apply_overrides(load_config("tiny"), [override])


def test_unknown_config_name_is_a_user_error():
  with pytest.raises(UserError, match="not found"):
    load_config("no-such-config")


def test_config_round_trips_through_the_run_folder(tmp_path):
  config = apply_overrides(load_config("default"), ["model.hidden=96", "seed=4"])
  save_config(config, tmp_path)
  again = read_config(tmp_path)
  assert again.to_dict() == config.to_dict()
  assert model_differences(config, again) == []
  assert model_differences(config, apply_overrides(again, ["model.layers=3"])) == ["model.layers: 2 -> 3"]


def test_reading_a_folder_without_a_run_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="no run"):
    read_config(tmp_path)


@pytest.mark.parametrize("content", ["[]", "{}", '{"model": 3}'])
def test_a_config_json_of_the_wrong_shape_is_a_user_error(tmp_path, content):
  (tmp_path / "config.json").write_text(content)
  with pytest.raises(UserError, match="not a musicgen config"):
    read_config(tmp_path)
