"""The original PyTorch project's hyper-parameters, on our causal LSTM."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the original's settings: pitch-only input, embedding 8, last 4 positions scored."""
  config = default.get_config()
  with config.unlocked():
    config.data.window = 256
    config.model.inputs = "pitch"
    config.model.heads = "regression"
    config.model.condition = "none"  # The events alone, as the original.
    config.model.embed = 8
    config.model.hidden = 512
    config.model.layers = 2
    config.model.dropout = 0.2
    config.train.batch_size = 4
    config.train.predict_last = 4
    config.train.isolation = "strict"
    config.sample.top_p = 1.0  # The pitch drawn from its whole distribution.
    for optimizer in config.train.optimizers.values():
      optimizer.name = "adam"
      optimizer.learning_rate = 0.002
      optimizer.warmup_steps = 0
      optimizer.decay = "exponential"
      optimizer.decay_rate = 0.9999  # Per epoch of the original: 10 passes.
      optimizer.decay_steps = 10
      optimizer.clip_norm = 0.0
  return config
