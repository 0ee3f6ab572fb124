"""The fused CPU kernel's helpers (its recurrence is checked in tests/test_lstm.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from musicgen_jax import fused_lstm


def test_scan_stacks_16_bit_outputs_unchanged():
  """The bit-pattern stacking that keeps XLA:CPU from rewriting bfloat16 stacks gives lax.scan's result."""
  xs = jax.random.normal(jax.random.key(0), (6, 4), jnp.float32)

  def step(carry, x):
    carry = carry * 0.5 + x
    return carry, (carry.astype(jnp.bfloat16), carry.astype(jnp.float16), carry)

  expected = jax.lax.scan(step, jnp.zeros(4), xs)
  ours = jax.jit(lambda xs: fused_lstm._scan(step, jnp.zeros(4), xs, reverse=False))(xs)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
