"""musicgen-jax: a causal three-head LSTM piano-music generator in JAX/Flax."""

__version__ = "0.1.0"
