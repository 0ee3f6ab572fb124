"""The CPU-tuned LSTM kernel and the matmul and dropout tricks it came with: `recurrence`, `dense`, `byte_dropout`.

The recurrence computes the textbook LSTM (`models.lstm_cell`) with one tanh for all four gates, a
hand-written backward pass whose per-step factors are computed in the forward pass and written over
the input projections, and 16-bit outputs stacked as integers; `tests/test_lstm.py` checks it against
`lax.scan` of the textbook cell, outputs and gradients. `model.recurrence=fused` selects it (the
default on CPUs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _gate_scale(hidden: int) -> jax.Array:
  """Per-unit scale s with act = s * tanh(s * x) + (1 - s): sigmoid for gates i, f, o (s = 1/2), tanh for g (s = 1).

  One tanh over all four gates replaces three sigmoids and a tanh (sigmoid(x) = tanh(x / 2) / 2 + 1 / 2).
  """
  half = jnp.full((hidden,), 0.5, jnp.float32)
  return jnp.concatenate([half, half, jnp.ones((hidden,), jnp.float32), half])


def _scan(step: Any, init: Any, xs: Any, **kwargs: Any) -> tuple[Any, Any]:
  """`jax.lax.scan` that stacks 16-bit float outputs as their bit patterns (uint16), then restores them.

  XLA:CPU stacks bfloat16 by converting the whole stacked array to float32 and back at every step,
  which made bfloat16 training slower than float32 there; integers are stacked in place everywhere.
  """
  out_dtypes = []

  def bit_step(carry: Any, x: Any) -> tuple[Any, Any]:
    carry, ys = step(carry, x)
    out_dtypes[:] = [y.dtype for y in jax.tree.leaves(ys)]
    as_bits = lambda y: jax.lax.bitcast_convert_type(y, jnp.uint16) if y.dtype.itemsize == 2 else y
    return carry, jax.tree.map(as_bits, ys)

  carry, ys = jax.lax.scan(bit_step, init, xs, **kwargs)
  leaves, treedef = jax.tree.flatten(ys)
  return carry, treedef.unflatten([
      jax.lax.bitcast_convert_type(y, dtype) if y.dtype != dtype else y for y, dtype in zip(leaves, out_dtypes)])


def _cell(pre_gates: jax.Array, c_prev: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One LSTM cell update from float32 pre-activations [batch, 4 * hidden]: new h, new c and the gates' tanh."""
  scale = _gate_scale(c_prev.shape[-1])
  tanh_gates = jnp.tanh(pre_gates * scale)
  i, f, g, o = jnp.split(tanh_gates * scale + (1.0 - scale), 4, axis=-1)
  c = f * c_prev + i * g
  return o * jnp.tanh(c), c, tanh_gates


def _backward_factors(tanh_gates: jax.Array, c_prev: jax.Array, c: jax.Array) -> tuple[jax.Array, ...]:
  """The factors of one step's backward pass that do not depend on later steps, computed in the forward
  pass where their inputs already are: d_pre = [dc, dc, dc, dh] * gate_factors, dc += dh * cell_factor,
  and the forget gate that carries dc to the step before."""
  scale = _gate_scale(c.shape[-1])
  i, f, g, o = jnp.split(tanh_gates * scale + (1.0 - scale), 4, axis=-1)
  tanh_c = jnp.tanh(c)
  gate_factors = jnp.concatenate([g, c_prev, i, tanh_c], axis=-1) * (scale * scale) * (1.0 - tanh_gates * tanh_gates)
  return gate_factors, o * (1.0 - tanh_c * tanh_c), f


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x @ kernel` accumulated and returned in float32 from operands in the compute dtype.

  Its backward pass runs its matmuls in the operands' dtype as well: autodiff of a float32-accumulating
  matmul would upcast both to float32, which makes bfloat16 training pay float32 matmuls backwards.
  """
  return jnp.dot(x, kernel, preferred_element_type=jnp.float32)


def _dense_fwd(x, kernel):
  return dense(x, kernel), (x, kernel)


def _dense_bwd(residuals, d_out):
  x, kernel = residuals
  d_out = d_out.astype(x.dtype)
  d_x = jax.lax.dot_general(d_out, kernel, (((d_out.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  d_kernel = jax.lax.dot_general(rows(x), rows(d_out), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _recurrence_forward(projected: jax.Array, bias: jax.Array, kernel: jax.Array, h0: jax.Array, c0: jax.Array,
                        *, keep_residuals: bool) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple]:
  """The recurrence over time-major float32 input projections `projected` [time, batch, 4 * hidden], with
  `bias` added at each step, where it costs no pass of its own. Returns (outputs, h, c) and, with
  `keep_residuals`, each step's `_backward_factors`.

  The loop carries the projections and, with `keep_residuals`, overwrites step t's row with step t's
  gate factors once it has read it: the factors need no buffer of their own, which would have to be
  zero-filled first.
  """

  def step(carry: tuple[jax.Array, ...], t: jax.Array) -> tuple[tuple[jax.Array, ...], tuple]:
    h, c_prev, rows = carry
    pre = (jax.lax.dynamic_index_in_dim(rows, t, keepdims=False) + bias.astype(jnp.float32)
           + jnp.dot(h.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32))
    h, c, tanh_gates = _cell(pre, c_prev)
    output = h.astype(kernel.dtype)
    if not keep_residuals:
      return (h, c, rows), (output,)
    gate_factors, cell_factor, forget = _backward_factors(tanh_gates, c_prev, c)
    return (h, c, jax.lax.dynamic_update_index_in_dim(rows, gate_factors, t, 0)), (output, cell_factor, forget)

  (h, c, gate_factors), (outputs, *residuals) = _scan(step, (h0, c0, projected), jnp.arange(projected.shape[0]))
  return (outputs, h, c), (gate_factors, *residuals) if keep_residuals else ()


@jax.custom_vjp
def recurrence(projected: jax.Array, bias: jax.Array, kernel: jax.Array, h0: jax.Array,
               c0: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The LSTM recurrence with a hand-written backward pass; returns outputs [time, batch, hidden], final h and c.

  The backward scan carries only dh and dc and emits the pre-activation gradients, which are the
  projections' gradients; the recurrent kernel's gradient is then one large matmul over all time
  steps instead of a small one per step.
  """
  return _recurrence_forward(projected, bias, kernel, h0, c0, keep_residuals=False)[0]


def _recurrence_fwd(projected, bias, kernel, h0, c0):
  result, factors = _recurrence_forward(projected, bias, kernel, h0, c0, keep_residuals=True)
  return result, (bias, kernel, h0, result[0], *factors)


def _recurrence_bwd(residuals, cotangents):
  bias, kernel, h0, outputs, gate_factors, cell_factor, forget = residuals
  d_outputs, dh_final, dc_final = cotangents

  # As in the forward pass, step t's pre-activation gradient overwrites its gate factors, read just before.
  def step(carry: tuple[jax.Array, ...], xs: tuple) -> tuple[tuple[jax.Array, ...], None]:
    dh, dc, rows = carry
    t, d_out, cell_factor_t, forget_t = xs
    dh = dh + d_out.astype(jnp.float32)
    dc = dc + dh * cell_factor_t
    d_pre = jnp.concatenate([dc, dc, dc, dh], axis=-1) * jax.lax.dynamic_index_in_dim(rows, t, keepdims=False)
    rows = jax.lax.dynamic_update_index_in_dim(rows, d_pre, t, 0)
    # The matmul reads d_pre back from the buffer, so that nothing reads the overwritten factors after
    # the write: otherwise XLA may recompute d_pre from them in another fusion and copy the buffer.
    d_pre = jax.lax.dynamic_index_in_dim(rows, t, keepdims=False).astype(kernel.dtype)
    dh_prev = jnp.dot(d_pre, kernel_t, preferred_element_type=jnp.float32)
    return (dh_prev, dc * forget_t, rows), None

  kernel_t = kernel.T  # Transposed once, so that the loop's matmul reads both operands row-major.
  (dh0, dc0, d_pre), _ = jax.lax.scan(
      step, (dh_final, dc_final, gate_factors), (jnp.arange(outputs.shape[0]), d_outputs, cell_factor, forget),
      reverse=True)
  # Step t's recurrent input is output t - 1 (h0 for t = 0).
  h_prev = jnp.concatenate([h0[None].astype(outputs.dtype), outputs[:-1]]).reshape(-1, outputs.shape[-1])
  flat_d_pre = d_pre.reshape(-1, d_pre.shape[-1])
  d_kernel = jnp.dot(h_prev.T, flat_d_pre.astype(outputs.dtype), preferred_element_type=jnp.float32)
  d_bias = jnp.sum(flat_d_pre, axis=0, dtype=jnp.float32)
  return d_pre, d_bias.astype(bias.dtype), d_kernel.astype(kernel.dtype), dh0.astype(h0.dtype), dc0


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def byte_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout whose keep decisions are random bytes, four from each random 32-bit word.

  Random-number generation dominated the heads' cost with `jax.random.bernoulli` (one word per
  element, regenerated again in the backward pass); bytes need a quarter of the words on every
  backend. The rate is rounded to a multiple of 1/256.
  """
  threshold = round(rate * 256)
  if threshold == 0:
    return x
  words = jax.random.bits(key, (-(-x.size // 4),), jnp.uint32)
  randoms = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:x.size].reshape(x.shape)
  scale = jnp.asarray(256 / (256 - threshold), x.dtype)
  return jnp.where(randoms >= threshold, x * scale, jnp.zeros((), x.dtype))
