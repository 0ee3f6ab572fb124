"""The demo's set-up: its own config, and a run of an earlier demo model met with one line, not a traceback."""

import pytest

from musicgen_jax import demo
from musicgen_jax.config import apply_overrides, load_config, save_config
from musicgen_jax.errors import UserError


def test_a_demo_run_of_another_model_is_refused_before_any_work(tmp_path):
  run = tmp_path / "demo" / "run"
  run.mkdir(parents=True)
  save_config(apply_overrides(load_config("tiny"), ["data.loudness_stretch=0.0"]), run)
  with pytest.raises(UserError, match="holds a demo run of another model.*remove that folder"):
    demo.run_demo(tmp_path, progress=False)
  assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["run"]
