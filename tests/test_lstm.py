"""The LSTM layer, both recurrences (scan, fused), against a plain lax.scan LSTM differentiated by autodiff
and against each other: outputs, states and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicgen_jax import models

BATCH, TIME, FEATURES, HIDDEN = 3, 7, 5, 8
LAYER_RECURRENCES = ("scan", "fused")


def reference_lstm(params: dict, inputs: jax.Array, h0: jax.Array, c0: jax.Array):
  """The textbook LSTM (gates i, f, g, o) over `inputs` [batch, time, features], in float32."""
  def step(carry, x_t):
    h, c = carry
    gates = x_t @ params["input_proj"]["kernel"] + params["input_proj"]["bias"] + h @ params["recurrent_kernel"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  (h, c), outputs = jax.lax.scan(step, (h0, c0), jnp.swapaxes(inputs, 0, 1))
  return jnp.swapaxes(outputs, 0, 1), h, c


def layer_and_params(dtype=jnp.float32, recurrence="fused") -> tuple[models.LSTMLayer, dict]:
  layer = models.LSTMLayer(FEATURES, HIDDEN, recurrence=recurrence, dtype=dtype, param_dtype=jnp.float32,
                           rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(1)
  layer.input_proj.bias.value = jnp.asarray(rng.normal(size=4 * HIDDEN), jnp.float32)
  return layer, nnx.to_pure_dict(nnx.state(layer))


def layer_fn(layer: models.LSTMLayer):
  """The layer as a pure function of its parameters (a pure dict, as the reference's), batch-major inputs and
  initial state; the layer itself reads and writes time-major."""
  graphdef = nnx.graphdef(layer)

  def run(params, inputs, h0, c0):
    outputs, final = nnx.merge(graphdef, params)(jnp.swapaxes(inputs, 0, 1), models.LSTMState(h0, c0))
    return jnp.swapaxes(outputs, 0, 1), final.h, final.c

  return run


def random_arguments(seed: int = 2):
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.normal(size=(BATCH, TIME, FEATURES)), jnp.float32)
  h0, c0 = (jnp.asarray(rng.normal(size=(BATCH, HIDDEN)), jnp.float32) for _ in range(2))
  return inputs, h0, c0


def weighted_sum(fn):
  """A scalar loss that weighs every output, the final h and the final c differently."""
  rng = np.random.default_rng(3)
  weights = [jnp.asarray(rng.normal(size=shape), jnp.float32)
             for shape in ((BATCH, TIME, HIDDEN), (BATCH, HIDDEN), (BATCH, HIDDEN))]

  def loss(*args):
    return sum(jnp.sum(w * x.astype(jnp.float32)) for w, x in zip(weights, fn(*args)))

  return loss


@pytest.mark.parametrize("recurrence", LAYER_RECURRENCES)
def test_outputs_and_final_state_match_the_reference(recurrence):
  layer, params = layer_and_params(recurrence=recurrence)
  args = random_arguments()
  for ours, expected in zip(jax.jit(layer_fn(layer))(params, *args), reference_lstm(params, *args)):
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("recurrence", LAYER_RECURRENCES)
def test_gradients_match_autodiff_of_the_reference(recurrence):
  layer, params = layer_and_params(recurrence=recurrence)
  args = random_arguments()
  wrt = (0, 1, 2, 3)
  ours = jax.jit(jax.grad(weighted_sum(layer_fn(layer)), argnums=wrt))(params, *args)
  expected = jax.grad(weighted_sum(reference_lstm), argnums=wrt)(params, *args)
  for name, a, b in zip(("params", "inputs", "h0", "c0"), ours, expected):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, err_msg=name), a, b)


@pytest.mark.parametrize("recurrence", LAYER_RECURRENCES)
def test_single_step_calls_chain_like_one_call(recurrence):
  layer, params = layer_and_params(recurrence=recurrence)
  inputs, h0, c0 = random_arguments()
  run = jax.jit(layer_fn(layer))
  whole, h_whole, c_whole = run(params, inputs, h0, c0)
  h, c = h0, c0
  for t in range(TIME):
    output, h, c = run(params, inputs[:, t:t + 1], h, c)
    np.testing.assert_allclose(output[:, 0], whole[:, t], atol=1e-5)
  np.testing.assert_allclose(h, h_whole, atol=1e-5)
  np.testing.assert_allclose(c, c_whole, atol=1e-5)


@pytest.mark.parametrize("recurrence", LAYER_RECURRENCES)
@pytest.mark.parametrize("wrt", [0, 1, 2, 3])
def test_bfloat16_compute_gradients_stay_close(wrt, recurrence):
  layer, params = layer_and_params(jnp.bfloat16, recurrence)
  args = random_arguments()
  outputs, h, c = jax.jit(layer_fn(layer))(params, *args)
  assert outputs.dtype == jnp.bfloat16 and h.dtype == jnp.float32 and c.dtype == jnp.float32
  ours = jax.jit(jax.grad(weighted_sum(layer_fn(layer)), argnums=wrt))(params, *args)
  expected = jax.grad(weighted_sum(reference_lstm), argnums=wrt)(params, *args)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.1 * float(jnp.max(jnp.abs(b))))


def test_scan_and_fused_give_the_same_outputs_and_gradients():
  """The readable cell under lax.scan and autodiff, and the CPU kernel with its hand-written backward pass."""
  args = random_arguments()
  results = {}
  for recurrence in LAYER_RECURRENCES:
    layer, params = layer_and_params(recurrence=recurrence)
    run = layer_fn(layer)
    results[recurrence] = (jax.jit(run)(params, *args),
                           jax.jit(jax.grad(weighted_sum(run), argnums=(0, 1, 2, 3)))(params, *args))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), results["scan"], results["fused"])
