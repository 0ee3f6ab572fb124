"""A few-minute CPU model for tests and the demo: same code paths, small shapes."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny configuration: trains a few hundred steps in under a minute on a CPU."""
  config = default.get_config()
  with config.unlocked():
    config.data.window = 32
    config.data.eval_windows = 32
    config.model.embed = 16
    config.model.hidden = 64
    config.model.layers = 2
    config.model.dropout = 0.0
    config.model.condition = "none"  # The tests name the controls where they test them.
    config.train.steps = 300
    config.train.batch_size = 16
    config.train.log_every = 25
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    config.train.sample_every = 0
    for optimizer in config.train.optimizers.values():
      optimizer.learning_rate = 3e-3
      optimizer.warmup_steps = 20
  return config
