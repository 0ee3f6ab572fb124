"""The cuDNN stack: our parameters packed into cuDNN's flat weights give jax.experimental.rnn's reference
LSTM our results; on a GPU, cuDNN itself against the scan recurrence; elsewhere, one clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import rnn

from musicgen_jax import cudnn_lstm, models, sampling
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
  """At full float32 precision: on a GPU the default lets both sides round their matmuls to TF32 (measured on
  an H200: differences of 8e-4), which would hide the layout under the rounding."""
  params, args = stack_params(), random_arguments()
  wrt = (0, 1, 2, 3)
  with jax.default_matmul_precision("highest"):
    for ours, expected in zip(jax.jit(scan_stack)(params, *args), reference_stack(params, *args)):
      np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
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


def reference_rnn_lstm(x, h_0, c_0, weights, seq_lengths, *, input_size, hidden_size, num_layers, dropout,
                       bidirectional):
  """`jax.experimental.rnn.lstm` computed by its reference `lstm_ref`, which runs on any backend."""
  unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
  return rnn.lstm_ref(x, h_0, c_0, *unpacked, seq_lengths, input_size, hidden_size, num_layers, dropout,
                      bidirectional)


@pytest.fixture(params=["lstm_ref", "cudnn"])
def kernel(request, monkeypatch) -> str:
  """The model's cuDNN path runs cuDNN itself on a GPU, and everywhere `lstm_ref` in its place."""
  if request.param == "cudnn" and cudnn_lstm.platform() is None:
    pytest.skip(NO_GPU)
  if request.param == "lstm_ref":
    monkeypatch.setattr(cudnn_lstm, "platform", lambda: "cuda")
    monkeypatch.setattr(cudnn_lstm.rnn, "lstm", reference_rnn_lstm)
  return request.param


def test_the_cudnn_path_matches_scan(kernel):
  """The model through its cuDNN path against the scan recurrence with the same parameters, at full float32
  precision (no TF32 in either): outputs, gradients, an empty call, and generation's one-position calls."""
  cudnn, scan = tiny_model("cudnn"), tiny_model("scan")
  assert cudnn.recurrence == "cudnn" and tiny_model("auto").recurrence == "cudnn"

  def events(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"pitch": jnp.asarray(rng.integers(0, 128, (4, 40)), jnp.int32),
            "dt": jnp.asarray(rng.random((4, 40)), jnp.float32),
            "velocity": jnp.asarray(rng.integers(0, 128, (4, 40)), jnp.float32)}

  inputs, targets = events(0), events(1)

  def loss(model):
    outputs, _ = model(inputs, targets=targets)
    return sum(jnp.sum(jnp.sin(output)) for output in outputs.values())

  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  forward, gradient = nnx.jit(lambda model: model(inputs, targets=targets)), nnx.jit(nnx.grad(loss))
  with jax.default_matmul_precision("highest"):
    (ours, ours_final), (expected, expected_final) = forward(cudnn), forward(scan)
    jax.tree.map(close, (ours, ours_final), (expected, expected_final))
    jax.tree.map(close, gradient(cudnn), gradient(scan))
    features, state = cudnn.features(jax.tree.map(lambda x: x[:, :0], inputs), ours_final)
    assert features.shape == (0, 4, 64)
    jax.tree.map(np.testing.assert_array_equal, state, ours_final)
    settings = sampling.make_settings(load_config("tiny"))
    keys = sampling.sequence_keys(0, 0, 4)
    start = jax.tree.map(lambda x: x[:, 0], inputs)
    draw = nnx.jit(lambda model: sampling.sample(model, model.initial_state(4), start, keys, settings, 6))
    (ours, (ours_state, *_)), (expected, (expected_state, *_)) = draw(cudnn), draw(scan)
    jax.tree.map(np.testing.assert_array_equal, ours, expected)
    jax.tree.map(close, ours_state, expected_state)


def test_one_position_runs_the_cell_and_longer_inputs_cudnn(kernel, monkeypatch):
  """The regression heads' sampler calls the model one position at a time: under cuDNN that runs the layers'
  cell (on an H200 2.4-4 times the events/s of a cuDNN call per position); windows and primers run cuDNN."""
  model, lengths = tiny_model("cudnn"), []
  cudnn_call = cudnn_lstm.lstm
  monkeypatch.setattr(cudnn_lstm, "lstm", lambda inputs, *args: lengths.append(inputs.shape[1]) or
                      cudnn_call(inputs, *args))
  for time in (1, 5, 0):
    inputs = {"pitch": jnp.zeros((2, time), jnp.int32), "dt": jnp.zeros((2, time)), "velocity": jnp.zeros((2, time))}
    features, _ = model.features(inputs, model.initial_state(2))
    assert features.shape == (time, 2, 64)
  assert lengths == [5, 0]


@pytest.mark.skipif(cudnn_lstm.platform() is None, reason=NO_GPU)
def test_cudnn_is_float32_only_and_auto_picks_fused_for_bfloat16():
  with pytest.raises(UserError, match="float32 only"):
    tiny_model("cudnn", "model.dtype=bfloat16")
  assert tiny_model("auto", "model.dtype=bfloat16").recurrence == "fused"
