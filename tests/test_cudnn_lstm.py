"""The cuDNN stack: our parameters packed into cuDNN's flat weights give jax.experimental.rnn's reference
LSTM our results; on a GPU, cuDNN itself against the scan recurrence; elsewhere, one clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import rnn

from musicgen_jax import cudnn_lstm, models
from musicgen_jax.config import apply_overrides, load_config
from musicgen_jax.errors import UserError

BATCH, TIME, FEATURES, HIDDEN, LAYERS = 3, 7, 5, 8, 2
NO_GPU = f"needs a CUDA or ROCm GPU for jax.experimental.rnn (cuDNN, MIOpen); JAX runs on {jax.default_backend()}"


def stack_params() -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """Two layers' (input kernel, recurrent kernel, bias), from LSTMLayer's initialisers and random biases."""
  rng = np.random.default_rng(1)
  layers = [models.LSTMLayer(FEATURES if i == 0 else HIDDEN, HIDDEN, recurrence="scan", dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=nnx.Rngs(params=i)) for i in range(LAYERS)]
  return [(kernel, recurrent, jnp.asarray(rng.normal(size=bias.shape), jnp.float32))
          for kernel, recurrent, bias in (layer.weights() for layer in layers)]


def random_arguments() -> tuple[jax.Array, jax.Array, jax.Array]:
  rng = np.random.default_rng(2)
  inputs = jnp.asarray(rng.normal(size=(BATCH, TIME, FEATURES)), jnp.float32)
  h0, c0 = (jnp.asarray(rng.normal(size=(LAYERS, BATCH, HIDDEN)), jnp.float32) for _ in range(2))
  return inputs, h0, c0


def scan_stack(params, inputs, h0, c0):
  """Our stack by `models.scan_recurrence`, batch-major like cuDNN: top outputs, final h and c of every layer."""
  x, finals = jnp.swapaxes(inputs, 0, 1), []
  for (kernel, recurrent, bias), h, c in zip(params, h0, c0):
    x, final = models.scan_recurrence(x @ kernel, bias, recurrent, models.LSTMState(h, c))
    finals.append(final)
  return jnp.swapaxes(x, 0, 1), jnp.stack([f.h for f in finals]), jnp.stack([f.c for f in finals])


def reference_stack(params, inputs, h0, c0):
  """`jax.experimental.rnn.lstm_ref` (cuDNN's semantics in plain JAX) on the flat weights we pack for cuDNN."""
  weights = rnn.unpack_lstm_weights(cudnn_lstm.flat_weights(params), FEATURES, HIDDEN, LAYERS, False)
  return rnn.lstm_ref(inputs, h0, c0, *weights, jnp.full((BATCH,), TIME, jnp.int32), FEATURES, HIDDEN, LAYERS,
                      0.0, False)


def weighted_sum(fn):
  """A scalar loss weighing the outputs and the final states differently."""
  rng = np.random.default_rng(3)
  weights = [jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((BATCH, TIME, HIDDEN), (LAYERS, BATCH, HIDDEN), (LAYERS, BATCH, HIDDEN))]
  return lambda *args: sum(jnp.sum(w * x) for w, x in zip(weights, fn(*args)))


def test_flat_weights_have_cudnn_size():
  assert cudnn_lstm.flat_weights(stack_params()).shape == (rnn.get_num_params_in_lstm(FEATURES, HIDDEN, LAYERS,
                                                                                      False),)


def test_packed_weights_give_the_reference_our_outputs_and_gradients():
  params, args = stack_params(), random_arguments()
  for ours, expected in zip(jax.jit(scan_stack)(params, *args), reference_stack(params, *args)):
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
  wrt = (0, 1, 2, 3)
  ours = jax.jit(jax.grad(weighted_sum(scan_stack), argnums=wrt))(params, *args)
  expected = jax.jit(jax.grad(weighted_sum(reference_stack), argnums=wrt))(params, *args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), ours, expected)


def tiny_model(recurrence: str, *overrides: str) -> models.MusicLSTM:
  config = apply_overrides(load_config("tiny"), [f"model.recurrence={recurrence}", *overrides])
  return models.MusicLSTM(config.model, rngs=nnx.Rngs(params=0))


@pytest.mark.skipif(cudnn_lstm.platform() is not None, reason="this backend runs cuDNN")
def test_cudnn_without_a_gpu_is_one_clear_line():
  with pytest.raises(UserError) as error:
    tiny_model("cudnn")
  message = str(error.value)
  assert "\n" not in message and "model.recurrence=cudnn needs a CUDA or ROCm GPU" in message
  assert "auto, scan or fused" in message


@pytest.mark.skipif(cudnn_lstm.platform() is None, reason=NO_GPU)
def test_cudnn_matches_scan_on_the_gpu():
  """The model through cuDNN against the scan recurrence with the same parameters, at full float32 precision
  (no TF32 in either): outputs, gradients, and one-position calls chained as generation makes them."""
  cudnn, scan = tiny_model("cudnn"), tiny_model("scan")
  assert cudnn.recurrence == "cudnn" and tiny_model("auto").recurrence == "cudnn"
  rng = np.random.default_rng(0)
  inputs = {"pitch": jnp.asarray(rng.integers(0, 128, (4, 40)), jnp.int32),
            "dt": jnp.asarray(rng.random((4, 40)), jnp.float32),
            "velocity": jnp.asarray(rng.integers(0, 128, (4, 40)), jnp.float32)}
  weights = jnp.asarray(rng.normal(size=(4, 40, 128)), jnp.float32)

  def loss(model):
    return jnp.sum(weights * model(inputs)[0]["pitch_logits"])

  with jax.default_matmul_precision("highest"):
    (ours, _), (expected, _) = cudnn(inputs), scan(inputs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4), ours, expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 nnx.grad(loss)(cudnn), nnx.grad(loss)(scan))
    state, steps = cudnn.initial_state(4), []
    for t in range(3):
      outputs, state = cudnn(jax.tree.map(lambda x: x[:, t:t + 1], inputs), state)
      steps.append(outputs["pitch_logits"])
    np.testing.assert_allclose(jnp.concatenate(steps, 1), expected["pitch_logits"][:, :3], rtol=0, atol=1e-4)
  with pytest.raises(UserError, match="float32 only"):
    tiny_model("cudnn", "model.dtype=bfloat16")
  assert tiny_model("auto", "model.dtype=bfloat16").recurrence == "scan"
