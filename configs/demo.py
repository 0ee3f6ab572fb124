"""The demo's model: what `musicgen demo` trains on the Bach chorales in a few minutes on a CPU."""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  """Returns the demo configuration: the tiny config with a wider LSTM and windows twice as long, which
  keep the four voices and the key of a chorale (the tiny shapes lose both), trained 3,000 steps."""
  config = tiny.get_config()
  with config.unlocked():
    config.data.window = 64
    config.data.eval_windows = 64
    # The chorales are written at one velocity: a loudness stretch would teach a spread they do not have.
    config.data.loudness_stretch = 0.0
    config.model.embed = 32
    config.model.hidden = 128
    config.train.steps = 3000
    config.train.batch_size = 32
  return config
