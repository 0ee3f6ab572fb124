"""The three-head causal LSTM: pitch embedding, stacked unidirectional LSTMs, pitch/time/velocity heads.

Continuous inputs and targets are scaled here and only here: velocity is divided by 127 (the
velocity head predicts it in [0, 1]); dt targets stay in seconds, and dt as an input is read as
log1p(dt / DT_INPUT_SCALE) so that milliseconds and seconds both land in a useful range.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicgen_jax import distributions

NUM_PITCHES = 128
MAX_VELOCITY = distributions.MAX_VELOCITY
DT_INPUT_SCALE = 0.01  # Seconds; dt inputs are fed as log1p(dt / DT_INPUT_SCALE).
INPUT_MODES = ("pitch", "pitch+dt+velocity")
HEAD_MODES = ("regression", "distribution")


class LSTMState(NamedTuple):
  """The recurrent state of one LSTM layer: hidden `h` and cell `c`, both [batch, hidden]."""

  h: jax.Array
  c: jax.Array


def continuous_inputs(dt: jax.Array, velocity: jax.Array) -> jax.Array:
  """The scaled dt and velocity features fed beside the pitch embedding, shape [..., 2]."""
  dt_feature = jnp.log1p(jnp.maximum(dt, 0.0) / DT_INPUT_SCALE)
  return jnp.stack([dt_feature, velocity / MAX_VELOCITY], axis=-1)


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
    return carry, jax.tree.map(lambda y: jax.lax.bitcast_convert_type(y, jnp.uint16) if y.dtype.itemsize == 2 else y, ys)

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
def _recurrence(projected: jax.Array, bias: jax.Array, kernel: jax.Array, h0: jax.Array,
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


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


class LSTMLayer(nnx.Module):
  """One unidirectional LSTM layer whose input projection runs over all time steps at once.

  Only the recurrent matmul stays inside `lax.scan`, which keeps the sequential part lean on every
  backend; a custom backward pass keeps it lean in training too (see `_recurrence`). Gates are
  ordered input, forget, cell, output; the cell state is kept in float32.
  """

  def __init__(self, in_features: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.hidden = hidden
    self.dtype = dtype
    self.input_proj = nnx.Linear(in_features, 4 * hidden, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=nnx.initializers.glorot_uniform(), rngs=rngs)
    self.recurrent_kernel = nnx.Param(
        nnx.initializers.orthogonal()(rngs.params(), (hidden, 4 * hidden), param_dtype))
    forget_bias = jnp.zeros((4 * hidden,), param_dtype).at[hidden:2 * hidden].set(1.0)
    self.input_proj.bias.value = forget_bias

  def initial_state(self, batch_size: int) -> LSTMState:
    zeros = jnp.zeros((batch_size, self.hidden), jnp.float32)
    return LSTMState(zeros, zeros)

  def project(self, inputs: jax.Array) -> jax.Array:
    """The float32 input projections (without the bias, which `run` adds) of `inputs` [..., features]."""
    return dense(inputs.astype(self.dtype), self.input_proj.kernel.value.astype(self.dtype))

  def project_embedded(self, embed: nnx.Embed, ids: jax.Array, extra: jax.Array | None = None) -> jax.Array:
    """`project` of [embed(ids), extra] (`extra` [..., k] may be absent). Where there are more positions
    than embedding rows (always in training), every row is projected once and looked up: no matmul over
    positions with the embedding's thin inner dimension, and no concatenated inputs."""
    table = embed.embedding.value
    if ids.size <= table.shape[0]:
      inputs = embed(ids)
      return self.project(inputs if extra is None else jnp.concatenate([inputs, extra.astype(inputs.dtype)], -1))
    kernel = self.input_proj.kernel.value.astype(self.dtype)
    projected = jnp.take(dense(table.astype(self.dtype), kernel[:table.shape[1]]), ids, axis=0)
    if extra is None:
      return projected
    return projected + dense(extra.astype(self.dtype), kernel[table.shape[1]:])

  def __call__(self, inputs: jax.Array, state: LSTMState) -> tuple[jax.Array, LSTMState]:
    """Runs the layer over time-major `inputs` [time, batch, features] from `state`; returns time-major
    outputs and the final state."""
    return self.run(self.project(inputs), state)

  def run(self, projected: jax.Array, state: LSTMState) -> tuple[jax.Array, LSTMState]:
    """The recurrence from `state` over time-major input projections [time, batch, 4 * hidden], as from
    `project` or `project_embedded`."""
    if projected.shape[0] == 0:  # Nothing to read (a one-event primer): the state stays as it is.
      return jnp.zeros((0, projected.shape[1], self.hidden), self.dtype), state
    outputs, h, c = _recurrence(projected, self.input_proj.bias.value.astype(self.dtype),
                                self.recurrent_kernel.value.astype(self.dtype), state.h, state.c)
    return outputs, LSTMState(h, c)


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


class Head(nnx.Module):
  """FC + Dropout + ReLU, FC + Dropout + ReLU, then FC to `out_features`: one head of the original.

  A head may read sub-events of the same event besides the features (`condition_classes`, the class
  count of each): each adds a learned row to the first layer's pre-activation, as a one-hot input would.
  """

  def __init__(self, in_features: int, widths: tuple[int, int], out_features: int, *, dropout: float,
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs, condition_classes: tuple[int, ...] = ()):
    sizes = (in_features, *widths)
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.conditions = nnx.List([nnx.Embed(count, widths[0], dtype=dtype, param_dtype=param_dtype,
                                          embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
                                for count in condition_classes])
    # The output layer computes in float32 whatever the compute dtype, as the logits of mixed-precision
    # language models: the losses' gradients enter the network there (in bfloat16 they cost accuracy).
    self.out = nnx.Linear(sizes[-1], out_features, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    self.dropout_rate = dropout

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None, conditions: tuple[jax.Array, ...] = ()) -> jax.Array:
    """Applies the head to `x` [..., features] and the class ids `conditions` (each shaped [...]). All leading
    axes are folded into one first: with a single row axis the weight gradients are plain matmuls, where
    with [batch, time] rows XLA made a transposed copy of every hidden gradient (the heads' backward pass
    took twice as long on CPU)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    for depth, layer in enumerate(self.hidden):
      kernel, bias = layer.kernel.value.astype(layer.dtype), layer.bias.value.astype(layer.dtype)
      x = dense(x.astype(layer.dtype), kernel) + bias
      if depth == 0:
        for table, ids in zip(self.conditions, conditions):
          x = x + table(ids.reshape(-1))
      if rngs is not None:
        x = byte_dropout(x, self.dropout_rate, rngs.dropout())
      x = jax.nn.relu(x)
    return self.out(x).reshape(*lead, -1)


class MusicLSTM(nnx.Module):
  """Pitch (and optionally dt and velocity) in; the next event's pitch, dt and velocity out.

  `model.heads="regression"` (the original): pitch logits, dt in seconds and velocity / 127, each head
  reading the LSTM features alone. `"distribution"`: logits over the classes of `distributions` for
  each sub-event, the heads in `model.order`, each also reading the sub-events before it (the targets
  in training, the drawn values in generation). With `isolate_heads` the time and velocity heads read
  the LSTM features through `stop_gradient`, so the trunk learns only from the pitch loss and each head
  from its own.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if config.inputs not in INPUT_MODES:
      raise ValueError(f"model.inputs must be one of {INPUT_MODES}, not {config.inputs!r}")
    if config.heads not in HEAD_MODES:
      raise ValueError(f"model.heads must be one of {HEAD_MODES}, not {config.heads!r}")
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.inputs = config.inputs
    self.head_mode = config.heads
    self.embed = nnx.Embed(NUM_PITCHES, config.embed, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    in_features = config.embed + (2 if config.inputs == "pitch+dt+velocity" else 0)
    self.lstm = nnx.List([
        LSTMLayer(in_features if i == 0 else config.hidden, config.hidden, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        for i in range(config.layers)])
    widths = tuple(config.hidden // d for d in config.head_divisors)
    regression = config.heads == "regression"
    self.order = ("pitch", "time", "velocity") if regression else tuple(config.order)
    if sorted(self.order) != sorted(distributions.SUB_EVENTS):
      raise ValueError(f"model.order must name each of {distributions.SUB_EVENTS} once, not {config.order!r}")
    self.time_bins = distributions.time_bins(config)
    class_counts = {"pitch": NUM_PITCHES, "velocity": distributions.NUM_VELOCITIES, "time": self.time_bins.count}

    def head(name: str) -> Head:
      before = () if regression else self.order[:self.order.index(name)]
      return Head(config.hidden, widths, 1 if regression and name != "pitch" else class_counts[name],
                  dropout=config.dropout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  condition_classes=tuple(class_counts[b] for b in before))

    self.pitch_head = head("pitch")
    self.time_head = head("time")
    self.velocity_head = head("velocity")

  def initial_state(self, batch_size: int) -> tuple[LSTMState, ...]:
    """The zero state of every layer, the state a training window and a generation start from."""
    return tuple(layer.initial_state(batch_size) for layer in self.lstm)

  def features(self, inputs: Mapping[str, jax.Array],
               state: tuple[LSTMState, ...]) -> tuple[jax.Array, tuple[LSTMState, ...]]:
    """The top LSTM layer's outputs for `inputs` [batch, time], time-major [time, batch, hidden], and the final
    states. Only the narrow inputs are transposed: the scans read time-major, and the heads take any order."""
    inputs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), dict(inputs))
    extra = continuous_inputs(inputs["dt"], inputs["velocity"]) if self.inputs == "pitch+dt+velocity" else None
    x, first_final = self.lstm[0].run(self.lstm[0].project_embedded(self.embed, inputs["pitch"], extra), state[0])
    final = [first_final]
    for layer, layer_state in zip(self.lstm[1:], state[1:]):
      x, layer_final = layer(x, layer_state)
      final.append(layer_final)
    return x, tuple(final)

  def head_logits(self, name: str, features: jax.Array, before: Mapping[str, jax.Array], *, isolate_heads: bool,
                  rngs: nnx.Rngs | None) -> jax.Array:
    """The output of sub-event `name`'s head from the features [..., hidden] and the classes [...] of the
    sub-events before it in `self.order` (`before` may hold more; only those are read)."""
    head = {"pitch": self.pitch_head, "time": self.time_head, "velocity": self.velocity_head}[name]
    x = jax.lax.stop_gradient(features) if isolate_heads and name != "pitch" else features
    conditions = tuple(before[b] for b in self.order[:self.order.index(name)]) if head.conditions else ()
    return head(x, rngs=rngs, conditions=conditions)

  def heads(self, features: jax.Array, targets: Mapping[str, jax.Array] | None = None, *, isolate_heads: bool,
            rngs: nnx.Rngs | None) -> dict[str, jax.Array]:
    """The heads' outputs at every position of `features`: `pitch_logits` and, in regression mode, `dt`
    (seconds) and `velocity` (/127), in distribution mode `time_logits` and `velocity_logits`, each head
    reading the `targets` classes (time-major, like the features) before it."""
    if self.head_mode == "regression":
      side = {"isolate_heads": isolate_heads, "rngs": rngs}
      return {"pitch_logits": self.head_logits("pitch", features, {}, **side),
              "dt": self.head_logits("time", features, {}, **side)[..., 0],
              "velocity": self.head_logits("velocity", features, {}, **side)[..., 0]}
    if targets is None:
      raise ValueError("distribution heads need the targets to read: pass targets, or draw with sampling")
    before = distributions.classes(targets, self.time_bins)
    return {f"{name}_logits": self.head_logits(name, features, before, isolate_heads=isolate_heads, rngs=rngs)
            for name in self.order}

  def __call__(self, inputs: Mapping[str, jax.Array], state: tuple[LSTMState, ...] | None = None, *,
               targets: Mapping[str, jax.Array] | None = None, isolate_heads: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[dict[str, jax.Array], tuple[LSTMState, ...]]:
    """Predicts the next event at every position of `inputs` [batch, time]; dropout only with `rngs`.
    Distribution heads read the next events `targets` [batch, time] (teacher forcing)."""
    if state is None:
      state = self.initial_state(inputs["pitch"].shape[0])
    features, final = self.features(inputs, state)
    if targets is not None:
      targets = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), dict(targets))
    outputs = self.heads(features, targets, isolate_heads=isolate_heads, rngs=rngs)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outputs), final
