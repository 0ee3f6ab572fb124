"""The LSTM stack as one cuDNN call (MIOpen on ROCm) through `jax.experimental.rnn`, from our parameters.

cuDNN takes one flat float32 weight vector in PyTorch's layout: per layer W_ih [4H, in] and W_hh
[4H, H], then per layer the biases b_ih and b_hh [4H], gates i, f, g, o as ours. `flat_weights`
packs our per-layer parameters into it (our one bias as b_ih, zeros as b_hh), so that every
recurrence shares one parameter layout and checkpoints move between them. `model.recurrence=cudnn`
selects it (the default on GPUs in float32).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import rnn

LayerWeights = tuple[jax.Array, jax.Array, jax.Array]  # Input kernel [in, 4H], recurrent kernel [H, 4H], bias [4H].


def platform() -> str | None:
  """`cuda` or `rocm` where JAX's default backend is a GPU that `jax.experimental.rnn` runs on, else None."""
  if jax.default_backend() not in ("gpu", "cuda", "rocm"):
    return None
  return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"


def flat_weights(layers: Sequence[LayerWeights]) -> jax.Array:
  """cuDNN's flat float32 weights of a stack of our layers: all W_ih, W_hh pairs, then all b_ih, b_hh pairs."""
  matrices = [matrix.T for kernel, recurrent_kernel, _ in layers for matrix in (kernel, recurrent_kernel)]
  biases = [vector for _, _, bias in layers for vector in (bias, jnp.zeros_like(bias))]
  return jnp.concatenate([a.astype(jnp.float32).reshape(-1) for a in matrices + biases])


def lstm(inputs: jax.Array, h0: jax.Array, c0: jax.Array,
         layers: Sequence[LayerWeights]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The stack over batch-major float32 `inputs` [batch, time, in] from `h0`, `c0` [layers, batch, hidden]:
  outputs [batch, time, hidden] of the top layer and the final h and c of every layer."""
  if inputs.shape[1] == 0:  # Nothing to read (a one-event primer): the state stays as it is.
    return jnp.zeros((*inputs.shape[:2], h0.shape[-1]), jnp.float32), h0, c0
  batch, time, in_features = inputs.shape
  hidden, num_layers = h0.shape[-1], len(layers)
  weights = flat_weights(layers)
  if platform() == "rocm":  # MIOpen orders the gates i, f, o, g.
    weights = rnn.swap_lstm_gates(weights, in_features, hidden, num_layers, False)
  return rnn.lstm(inputs, h0, c0, weights, jnp.full((batch,), time, jnp.int32), input_size=in_features,
                  hidden_size=hidden, num_layers=num_layers, dropout=0.0, bidirectional=False)
