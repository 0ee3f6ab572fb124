"""The menu's answers: a bad config is refused when it is typed, and an empty step count trains until Ctrl+C."""

import io
from types import SimpleNamespace

from musicgen_jax import menu, prepare, train

BAD_CONFIG = """
from musicgen_jax.config import load_config


def get_config():
  config = load_config("tiny")
  with config.unlocked():
    config.model.dropout = 1.5
  return config
"""


def test_a_bad_config_answer_is_refused_and_an_empty_step_count_trains_until_stopped(tmp_path, monkeypatch):
  monkeypatch.setenv("MUSICGEN_HOME", str(tmp_path / "home"))
  (tmp_path / "bad.py").write_text(BAD_CONFIG)
  monkeypatch.setattr(prepare, "prepare_corpus", lambda *args, **kwargs: None)
  trained = []

  def fake_train(config, workdir, **kwargs):
    trained.append(config)
    return SimpleNamespace(step=12)

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  answers = ["1", "0", "piano", "", str(tmp_path), "nowhere", str(tmp_path / "bad.py"), "tiny", "", "3"]
  out = io.StringIO()
  assert menu.run_menu(io.StringIO("\n".join(answers) + "\n"), out) == 0
  said = out.getvalue()
  assert "config 'nowhere' not found" in said
  assert "bad config value model.dropout=1.5: it must be a number in [0, 1)\nType another config." in said
  assert said.count("Config (default, demo, original, tiny or a file)") == 3
  (config,) = trained
  assert config.model.dropout == 0.0 and config.train.steps == train.UNTIL_STOPPED
  assert "Saved piano at step 12" in said


def test_a_run_trained_until_stopped_has_a_bar_without_an_end():
  bar = train.progress_bar(train.UNTIL_STOPPED, 0, False)
  assert bar.total is None
