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

from musicgen_jax import cudnn_lstm, distributions, fused_lstm
from musicgen_jax.errors import UserError
from musicgen_jax.fused_lstm import byte_dropout, dense

NUM_PITCHES = 128
MAX_VELOCITY = distributions.MAX_VELOCITY
DT_INPUT_SCALE = 0.01  # Seconds; dt inputs are fed as log1p(dt / DT_INPUT_SCALE).
INPUT_MODES = ("pitch", "pitch+dt+velocity")
HEAD_MODES = ("regression", "distribution")
CONTROLS = ("density", "polyphony")  # What a conditioned model can read besides the events, in reading order.
# model.condition: the controls every position reads ("none", or some of CONTROLS joined by "+").
CONDITIONS = ("none", "density", "polyphony", "density+polyphony")
DENSITY_REFERENCE = 8.0  # Notes per second read as 0 by the density control (MAESTRO's pieces: about 10).
DENSITY_RANGE = (0.25, 100.0)  # Notes per second; the control reads densities outside it as its ends.
POLYPHONY_REFERENCE = 4.0  # Notes sounding at once read as 0 by the polyphony control (MAESTRO's pieces: about 5.5).
POLYPHONY_RANGE = (0.5, 64.0)  # Notes; the control reads polyphonies outside it as its ends.
RECURRENCES = ("auto", "scan", "fused", "cudnn")  # model.recurrence: how the LSTM runs, never what it computes.


class LSTMState(NamedTuple):
  """The recurrent state of one LSTM layer: hidden `h` and cell `c`, both [batch, hidden]."""

  h: jax.Array
  c: jax.Array


def swap_batch_time(tree: Any) -> Any:
  """The arrays of `tree` with their first two axes, batch and time, swapped: the LSTM and the heads run
  time-major, the model's inputs and outputs are batch-major."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)


def continuous_inputs(dt: jax.Array, velocity: jax.Array) -> jax.Array:
  """The scaled dt and velocity features fed beside the pitch embedding, shape [..., 2]."""
  dt_feature = jnp.log1p(jnp.maximum(dt, 0.0) / DT_INPUT_SCALE)
  return jnp.stack([dt_feature, velocity / MAX_VELOCITY], axis=-1)


def density_control(notes: Any, seconds: Any) -> jax.Array:
  """The note-density control: log of `notes` onsets per `seconds` of music, over DENSITY_REFERENCE, clipped to
  DENSITY_RANGE (any matching shapes)."""
  per_second = jnp.asarray(notes, jnp.float32) / jnp.maximum(jnp.asarray(seconds, jnp.float32), 1e-3)
  return jnp.log(jnp.clip(per_second, *DENSITY_RANGE) / DENSITY_REFERENCE)


def polyphony_control(notes_sounding: Any) -> jax.Array:
  """The polyphony control: log of the mean number of notes sounding at once over POLYPHONY_REFERENCE, clipped to
  POLYPHONY_RANGE (any shape)."""
  return jnp.log(jnp.clip(jnp.asarray(notes_sounding, jnp.float32), *POLYPHONY_RANGE) / POLYPHONY_REFERENCE)


def controls_of(model_config: Mapping[str, Any]) -> tuple[str, ...]:
  """The controls a model config's `model.condition` reads, in CONTROLS order: none for "none" and for runs saved
  before the key existed."""
  condition = model_config.get("condition", "none")
  return () if condition == "none" else tuple(condition.split("+"))


def window_density(events: Mapping[str, jax.Array]) -> jax.Array:
  """The `density_control` [batch] of event streams [batch, time]: their onsets over their seconds."""
  return density_control(jnp.sum(events["velocity"] > 0, axis=-1), jnp.sum(events["dt"], axis=-1, dtype=jnp.float32))


def window_polyphony(inputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                     held: jax.Array | None = None) -> jax.Array:
  """The `polyphony_control` [batch] of the stream that `inputs` [batch, time] start and `targets` (the inputs
  shifted by one event) end, from the pitches `held` before it (default silence): the notes sounding in each gap
  between two events, weighted by its dt, averaged over the time some note sounds (as `musicgen stats`'s mean
  polyphony)."""
  counts = jnp.sum(held_pitches(inputs["pitch"], inputs["dt"], inputs["velocity"], held) >= 0, axis=-1)
  dt = targets["dt"].astype(jnp.float32)
  sounding_time = jnp.sum(jnp.where(counts > 0, dt, 0.0), axis=-1)
  return polyphony_control(jnp.sum(counts * dt, axis=-1) / jnp.maximum(sounding_time, 1e-3))


def window_controls(names: tuple[str, ...], inputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                    held: jax.Array | None = None) -> dict[str, jax.Array]:
  """The controls `names` [batch] of the window that `inputs` [batch, time] start and `targets` end (see
  `window_polyphony`): what a conditioned model reads in training, and a primer's own."""
  measures = {"density": lambda: window_density(targets), "polyphony": lambda: window_polyphony(inputs, targets, held)}
  return {name: measures[name]() for name in names}


def resolve_recurrence(name: str, dtype: Any) -> str:
  """The recurrence that `model.recurrence=name` runs on this backend: `auto` is cuDNN on GPUs in float32,
  the fused kernel on CPUs and on GPUs in bfloat16 (on an H200 1.5-1.6 times `scan`'s training events/s),
  and `scan` elsewhere (TPUs). One it cannot run is a UserError."""
  if name not in RECURRENCES:
    raise UserError(f"model.recurrence must be one of {', '.join(RECURRENCES)}, not {name!r}")
  float32 = jnp.dtype(dtype) == jnp.float32
  if name == "auto":
    if cudnn_lstm.platform() and float32:
      return "cudnn"
    return "fused" if jax.default_backend() == "cpu" or cudnn_lstm.platform() else "scan"
  if name == "cudnn" and not cudnn_lstm.platform():
    raise UserError(f"model.recurrence=cudnn needs a CUDA or ROCm GPU, but JAX runs on {jax.default_backend()} "
                    "here: use auto, scan or fused")
  if name == "cudnn" and not float32:
    raise UserError(f"model.recurrence=cudnn computes in float32 only, not model.dtype={jnp.dtype(dtype).name}: "
                    "use fused, scan or auto for bfloat16")
  return name


def cell_update(gates: jax.Array, c: jax.Array) -> LSTMState:
  """The textbook LSTM cell from its gates' float32 pre-activations [batch, 4 * hidden] (i, f, g, o) and the
  cell state `c` [batch, hidden]."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return LSTMState(jax.nn.sigmoid(o) * jnp.tanh(c), c)


def lstm_cell(state: LSTMState, gate_inputs: jax.Array, kernel: jax.Array) -> LSTMState:
  """One step of the textbook LSTM from `gate_inputs` [batch, 4 * hidden], the input projection plus bias in
  float32, and the recurrent `kernel` [hidden, 4 * hidden] in the compute dtype."""
  return cell_update(gate_inputs + dense(state.h.astype(kernel.dtype), kernel), state.c)


def scan_recurrence(projected: jax.Array, bias: jax.Array, kernel: jax.Array,
                    state: LSTMState) -> tuple[jax.Array, LSTMState]:
  """`lstm_cell` over time-major input projections [time, batch, 4 * hidden] by `lax.scan`, differentiated by
  autodiff: outputs [time, batch, hidden] in the kernel's dtype and the final state."""

  def step(state: LSTMState, x: jax.Array) -> tuple[LSTMState, jax.Array]:
    state = lstm_cell(state, x + bias.astype(jnp.float32), kernel)
    return state, state.h.astype(kernel.dtype)

  final, outputs = jax.lax.scan(step, state, projected)
  return outputs, final


class LSTMLayer(nnx.Module):
  """One unidirectional LSTM layer whose input projection runs over all time steps at once.

  Only the recurrent matmul stays inside the loop over time: `scan_recurrence`, or with
  `recurrence="fused"` the CPU kernel `fused_lstm.recurrence` (same results, a hand-written backward
  pass). Gates are ordered input, forget, cell, output; the cell state is kept in float32.
  """

  def __init__(self, in_features: int, hidden: int, *, recurrence: str = "fused", dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    if recurrence not in ("scan", "fused"):
      raise ValueError(f"an LSTMLayer runs scan or fused, not {recurrence!r}")
    self.recurrence = recurrence
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
    bias, kernel = self.recurrent_weights()
    if self.recurrence == "scan":
      return scan_recurrence(projected, bias, kernel, state)
    outputs, h, c = fused_lstm.recurrence(projected, bias, kernel, state.h, state.c)
    return outputs, LSTMState(h, c)

  def recurrent_weights(self) -> tuple[jax.Array, jax.Array]:
    """The bias and the recurrent kernel in the compute dtype, as every recurrence reads them."""
    return self.input_proj.bias.value.astype(self.dtype), self.recurrent_kernel.value.astype(self.dtype)

  def recurrent_term(self, state: LSTMState) -> jax.Array:
    """h times the recurrent kernel, plus the bias [batch, 4 * hidden] in float32: the part of the next
    position's gates that `state` alone decides (`MusicLSTM.step` adds the input projection)."""
    bias, kernel = self.recurrent_weights()
    return dense(state.h.astype(self.dtype), kernel) + bias.astype(jnp.float32)

  def weights(self) -> cudnn_lstm.LayerWeights:
    """The input kernel, recurrent kernel and bias, as `cudnn_lstm` takes them."""
    return self.input_proj.kernel.value, self.recurrent_kernel.value, self.input_proj.bias.value


SILENT = -1.0  # The `held` value of a pitch that does not sound.
AGE_STEP = 0.5  # Spacing of the age grid in log1p(age / 10 ms).
AGE_POINTS = 19  # Grid points 0, 0.5, ..., 9: ages 0 to 81 s; older notes read as the last point.


def held_pitches(pitch: jax.Array, dt: jax.Array, velocity: jax.Array, before: jax.Array | None = None, *,
                 time_major: bool = False) -> jax.Array:
  """For how many seconds each pitch has sounded since its onset [B, T, 128] after each event of streams
  [B, T] (SILENT where it does not sound), given the same before the first event (`before` [B, 128], default
  silence): a pitch's latest event decides whether it sounds, an onset or a release. With `time_major` the
  streams are [T, B] and the result [T, B, 128], as the heads read it: computed so, not transposed."""
  if not time_major:
    return swap_batch_time(held_pitches(*swap_batch_time((pitch, dt, velocity)), before, time_major=True))
  length, batch = pitch.shape
  positions = jnp.arange(length)[:, None, None]
  # The latest event of each pitch so far; an associative scan takes a fifth of `lax.cummax`'s time on a CPU.
  latest = jax.lax.associative_scan(
      jnp.maximum, jnp.where(pitch[..., None] == jnp.arange(NUM_PITCHES), positions, -1), axis=0)
  index = jnp.maximum(latest, 0) * batch + jnp.arange(batch)[None, :, None]  # In the flattened [T * B] streams.
  onset = (velocity > 0).ravel().at[index].get(mode="promise_in_bounds")
  clock = jnp.cumsum(dt.astype(jnp.float32), axis=0)
  since_latest = clock[..., None] - clock.ravel().at[index].get(mode="promise_in_bounds")
  before = jnp.full((batch, NUM_PITCHES), SILENT) if before is None else before
  carried = jnp.where(before[None] >= 0, before[None] + clock[..., None], SILENT)
  return jnp.where(latest >= 0, jnp.where(onset, since_latest, SILENT), carried)


def age_position(held: jax.Array) -> jax.Array:
  """Each pitch's place on the age grid [..., P] from `held` [..., P]: log1p(age / 10 ms) in grid steps,
  clipped to the grid (0 for a silent pitch, which `HeldTerms.sounding` tells apart)."""
  return jnp.clip(jnp.log1p(jnp.maximum(held, 0.0) / DT_INPUT_SCALE) / AGE_STEP, 0.0, AGE_POINTS - 1)


def grid_weights(position: jax.Array) -> jax.Array:
  """The two grid points around each `position` [...] weighted by nearness, summing to 1 [..., AGE_POINTS]. A
  function of the age read through these weights is piecewise linear in the log age: the chance of a
  release may rise and fall."""
  return jnp.maximum(1.0 - jnp.abs(position[..., None] - jnp.arange(AGE_POINTS)), 0.0)


def age_weights(held: jax.Array) -> jax.Array:
  """Each pitch's age on the age grid [..., P, AGE_POINTS] from `held` [..., P]: its `grid_weights`, all
  zero for a silent pitch."""
  return jnp.where((held >= 0)[..., None], grid_weights(age_position(held)), 0.0)


def grid_cell(position: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The grid point below each `position` (the last but one at the top) and how far above it the position
  lies, in [0, 1]: the two nonzero `grid_weights` are 1 - that at the point and that at the next."""
  lower = jnp.minimum(jnp.floor(position), AGE_POINTS - 2)
  return lower.astype(jnp.int32), position - lower


def flat_index(lower: jax.Array) -> jax.Array:
  """Where the grid points `lower` [..., P] lie in an array [..., AGE_POINTS] flattened: one index per
  value, cheaper to gather and scatter by than index pairs."""
  rows = jnp.arange(lower[..., 0].size, dtype=jnp.int32).reshape(*lower.shape[:-1], 1)
  return rows * AGE_POINTS + lower


class HeldTerms(NamedTuple):
  """The held pitches as the heads read them, computed once per position for all heads: which pitches
  sound [..., 128], each pitch's `age_position` [..., 128], and how many notes of each age sound (the
  `age_weights` summed over the pitches) [..., AGE_POINTS]. The weights of every pitch on the grid
  [..., 128, AGE_POINTS] are never formed: each reader takes the two it needs (`grid_cell`), which on a
  CPU costs a third of writing them all out."""

  sounding: jax.Array
  position: jax.Array
  census: jax.Array

  def read_by_age(self, values: jax.Array) -> jax.Array:
    """Each pitch's value [..., P] read at its note's age from `values` [..., AGE_POINTS] on the age grid,
    interpolated between the two grid points around it (meaningless for a silent pitch)."""
    lower, above = grid_cell(self.position)
    flat, index = values.ravel(), flat_index(lower)
    at_lower = flat.at[index].get(mode="promise_in_bounds")
    return at_lower + above * (flat.at[index + 1].get(mode="promise_in_bounds") - at_lower)

  def pitch_age(self, pitch: jax.Array) -> jax.Array:
    """The `age_weights` [..., AGE_POINTS] of one pitch per position, `pitch` [...]: zero for a silent one."""
    position = jnp.take_along_axis(self.position, pitch[..., None], axis=-1)[..., 0]
    sounding = jnp.take_along_axis(self.sounding, pitch[..., None], axis=-1)
    return jnp.where(sounding, grid_weights(position), 0.0)


def read_held(held: jax.Array) -> HeldTerms:
  """The `HeldTerms` of the pitches `held` [..., 128] after an input event (`held_pitches`)."""
  sounding, position = held >= 0, age_position(held)
  lower, above = grid_cell(position)
  weight = sounding.astype(jnp.float32)
  # Each note adds to the two grid points around its age at once: one scatter of pairs, whose update array
  # is computed in one pass (two scatters of single values each recomputed the ages).
  pairs = jnp.stack([weight * (1.0 - above), weight * above], axis=-1).reshape(-1, 2)
  pair_at = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(),
                                            scatter_dims_to_operand_dims=(0,))
  census = jax.lax.scatter_add(jnp.zeros(held[..., 0].size * AGE_POINTS), flat_index(lower).reshape(-1, 1), pairs,
                               pair_at, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  return HeldTerms(sounding, position, census.reshape(*held.shape[:-1], AGE_POINTS))


class Head(nnx.Module):
  """FC + Dropout + ReLU, FC + Dropout + ReLU, then FC to `out_features`: one head of the original.

  A head may read sub-events of the same event besides the features (`condition_classes`, the class
  count of each): each adds a learned row to the first layer's pre-activation, as a one-hot input would.
  A head may read the controls of a conditioned model (`controls`) into its first layer, and the held pitches
  (`HeldTerms`): how many notes of each age sound, into its first layer;
  with `reads_own`, the age of the event's drawn pitch (zero for an onset), into its first layer and its
  output. The pitch head (`per_pitch`) also reads which pitches sound into its first layer, scores an
  onset and a release of every pitch apart (two logits a pitch), and a release also by the age of its
  note, weighted by the head's last layer: the same weights for every pitch, so that "release the notes
  held too long" is learned once for the whole keyboard.
  """

  def __init__(self, in_features: int, widths: tuple[int, int], out_features: int, *, dropout: float,
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs, condition_classes: tuple[int, ...] = (),
               reads_held: bool = False, reads_own: bool = False, per_pitch: bool = False,
               controls: tuple[str, ...] = ()):
    sizes = (in_features, *widths)
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.conditions = nnx.List([nnx.Embed(count, widths[0], dtype=dtype, param_dtype=param_dtype,
                                          embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
                                for count in condition_classes])

    def linear(features: int, out: int, **kwargs: Any) -> nnx.Linear:
      return nnx.Linear(features, out, param_dtype=param_dtype, rngs=rngs, **kwargs)

    zeros = {"kernel_init": nnx.initializers.zeros, "dtype": jnp.float32}
    self.census = linear(AGE_POINTS, widths[0], use_bias=False, dtype=dtype) if reads_held else None
    self.own = linear(AGE_POINTS, widths[0], use_bias=False, dtype=dtype) if reads_own else None
    self.own_out = linear(AGE_POINTS, out_features, use_bias=False, **zeros) if reads_own else None
    self.sounding = linear(NUM_PITCHES, widths[0], use_bias=False, dtype=dtype) if per_pitch else None
    self.controls = controls
    for name in controls:  # A learned row each, as the sub-events' (named for the control: `density`, ...).
      setattr(self, name, linear(1, widths[0], use_bias=False, dtype=dtype))
    self.release_age = linear(widths[-1], AGE_POINTS, **zeros) if per_pitch else None
    # The output layer computes in float32 whatever the compute dtype, as the logits of mixed-precision
    # language models: the losses' gradients enter the network there (in bfloat16 they cost accuracy).
    self.out = linear(sizes[-1], out_features * (2 if per_pitch else 1), dtype=jnp.float32)
    self.dropout_rate = dropout

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None, conditions: tuple[jax.Array, ...] = (),
               held: HeldTerms | None = None, own: jax.Array | None = None,
               controls: Mapping[str, jax.Array] | None = None, first_layer: jax.Array | None = None) -> jax.Array:
    """Applies the head to `x` [..., features], the class ids `conditions` (each shaped [...]) and, where it
    reads them, the held pitches `held`, the drawn pitch's `age_weights` `own` [..., AGE_POINTS] and the
    `controls` ({name: [...]}); given
    `first_layer`, the first layer's weights and bias already applied to `x` (`MusicLSTM.first_layers`). All
    leading axes are folded into one first: with a single row axis the weight gradients are plain matmuls,
    where with [batch, time] rows XLA made a transposed copy of every hidden gradient (the heads' backward
    pass took twice as long on CPU)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if held is not None:
      held = HeldTerms(*(term.reshape(-1, *term.shape[len(lead):]) for term in held))
    if own is not None:
      own = own.reshape(-1, own.shape[-1])
    for depth, layer in enumerate(self.hidden):
      kernel, bias = layer.kernel.value.astype(layer.dtype), layer.bias.value.astype(layer.dtype)
      if depth or first_layer is None:
        x = dense(x.astype(layer.dtype), kernel) + bias
      else:
        x = first_layer.reshape(x.shape[0], -1)
      if depth == 0:
        for table, ids in zip(self.conditions, conditions):
          x = x + table(ids.reshape(-1))
        read = [(self.own, own)] if held is None else [(self.census, held.census), (self.sounding, held.sounding),
                                                        (self.own, own)]
        read += [(getattr(self, name), controls[name].reshape(-1, 1)) for name in self.controls]
        read = [(projection.kernel.value, value) for projection, value in read if projection is not None]
        if read:  # One matmul for all: each would write and re-read the whole pre-activation.
          x = x + dense(jnp.concatenate([value.astype(layer.dtype) for _, value in read], -1),
                        jnp.concatenate([kernel.astype(layer.dtype) for kernel, _ in read], 0))
      if rngs is not None:
        x = byte_dropout(x, self.dropout_rate, rngs.dropout())
      x = jax.nn.relu(x)
    logits = self.out(x)
    if self.own_out is not None:
      logits = logits + dense(own, self.own_out.kernel.value)
    if self.release_age is not None:
      onset, release = jnp.split(logits, 2, axis=-1)
      release = release + held.read_by_age(self.release_age(x))
      logits = jnp.where(held.sounding, release, onset)
    return logits.reshape(*lead, -1)


class MusicLSTM(nnx.Module):
  """Pitch (and optionally dt and velocity) in; the next event's pitch, dt and velocity out.

  `model.heads="regression"` (the original): pitch logits, dt in seconds and velocity / 127, each head
  reading the LSTM features alone. `"distribution"`: logits over the classes of `distributions` for
  each sub-event, the heads in `model.order`, each also reading the sub-events before it (the targets
  in training, the drawn values in generation). With `isolate_heads` the time and velocity heads read
  the LSTM features through `stop_gradient`, so the trunk learns only from the pitch loss and each head
  from its own. `model.recurrence` (see `resolve_recurrence`) chooses how the LSTM runs; the parameters
  are the same for every choice. Under cuDNN the layers hold the parameters and one cuDNN call runs the stack.
  `model.condition` adds controls that every position reads, the LSTM as inputs and each head in its first
  layer: `inputs["density"]` [batch, time], a `density_control`, and `inputs["polyphony"]`, a
  `polyphony_control` (in training, each window's own: `window_controls`), so that generation can be told, or
  drawn, how many notes a second to play and how many to hold at once, and keeps to them.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if config.inputs not in INPUT_MODES:
      raise ValueError(f"model.inputs must be one of {INPUT_MODES}, not {config.inputs!r}")
    if config.heads not in HEAD_MODES:
      raise ValueError(f"model.heads must be one of {HEAD_MODES}, not {config.heads!r}")
    if config.get("condition", "none") not in CONDITIONS:
      raise ValueError(f"model.condition must be one of {CONDITIONS}, not {config.condition!r}")
    self.controls = controls_of(config)
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.inputs = config.inputs
    self.head_mode = config.heads
    # Runs saved before model.recurrence existed have none in their config.json.
    self.recurrence = resolve_recurrence(config.get("recurrence", "auto"), dtype)
    self.embed = nnx.Embed(NUM_PITCHES, config.embed, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    in_features = config.embed + (2 if config.inputs == "pitch+dt+velocity" else 0) + len(self.controls)
    self.lstm = nnx.List([
        LSTMLayer(in_features if i == 0 else config.hidden, config.hidden,
                  recurrence="fused" if self.recurrence == "fused" else "scan", dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        for i in range(config.layers)])
    widths = tuple(config.hidden // d for d in config.head_divisors)
    regression = config.heads == "regression"
    # Distribution heads read which pitches sound, where the inputs tell onsets from releases.
    reads_held = not regression and config.inputs == "pitch+dt+velocity"
    self.order = ("pitch", "time", "velocity") if regression else tuple(config.order)
    if sorted(self.order) != sorted(distributions.SUB_EVENTS):
      raise ValueError(f"model.order must name each of {distributions.SUB_EVENTS} once, not {config.order!r}")
    self.time_bins = distributions.time_bins(config)
    class_counts = {"pitch": NUM_PITCHES, "velocity": distributions.NUM_VELOCITIES, "time": self.time_bins.count}

    def head(name: str) -> Head:
      before = () if regression else self.order[:self.order.index(name)]
      outputs = self.time_bins.outputs if name == "time" else class_counts[name]
      return Head(config.hidden, widths, 1 if regression and name != "pitch" else outputs,
                  dropout=config.dropout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  condition_classes=tuple(class_counts[b] for b in before), reads_held=reads_held,
                  reads_own=reads_held and "pitch" in before, per_pitch=reads_held and name == "pitch",
                  controls=self.controls)

    self.pitch_head = head("pitch")
    self.time_head = head("time")
    self.velocity_head = head("velocity")

  def initial_state(self, batch_size: int) -> tuple[LSTMState, ...]:
    """The zero state of every layer, the state a training window and a generation start from."""
    return tuple(layer.initial_state(batch_size) for layer in self.lstm)

  def features(self, inputs: Mapping[str, jax.Array],
               state: tuple[LSTMState, ...]) -> tuple[jax.Array, tuple[LSTMState, ...]]:
    """The top LSTM layer's outputs for `inputs` [batch, time], time-major [time, batch, hidden], and the final
    states. Only the narrow inputs are transposed: the scans read time-major, and the heads take any order.
    Under cuDNN one position (the regression heads' sampler) runs the layers' cell instead, which generated
    2.4-4 times cuDNN's events/s on an H200."""
    if self.recurrence == "cudnn" and inputs["pitch"].shape[1] != 1:
      return self.cudnn_features(inputs, state)
    x, first_final = self.lstm[0].run(self.input_projection(swap_batch_time(dict(inputs))), state[0])
    final = [first_final]
    for layer, layer_state in zip(self.lstm[1:], state[1:]):
      x, layer_final = layer(x, layer_state)
      final.append(layer_final)
    return x, tuple(final)

  @property
  def conditioned(self) -> bool:
    """Whether every position reads controls (`self.controls`) besides the events."""
    return bool(self.controls)

  def extra_inputs(self, inputs: Mapping[str, jax.Array]) -> jax.Array | None:
    """The features [..., k] fed to the first layer beside the pitch embedding of events `inputs` [...]: dt and
    velocity and the controls, those the model reads (None if none)."""
    columns = [continuous_inputs(inputs["dt"], inputs["velocity"])] if self.inputs == "pitch+dt+velocity" else []
    columns += [inputs[name][..., None].astype(jnp.float32) for name in self.controls]
    if len(columns) > 1:
      return jnp.concatenate(columns, -1)
    return columns[0] if columns else None

  def input_projection(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
    """The first layer's input projection [..., 4 * hidden] of events `inputs` (pitch, and dt, velocity and
    density where the model reads them) of any shape [...]."""
    return self.lstm[0].project_embedded(self.embed, inputs["pitch"], self.extra_inputs(inputs))

  def recurrent_terms(self, state: tuple[LSTMState, ...]) -> tuple[jax.Array, ...]:
    """Each layer's `LSTMLayer.recurrent_term` of `state`, what `step` reads beside the next event."""
    return tuple(layer.recurrent_term(layer_state) for layer, layer_state in zip(self.lstm, state))

  def step(self, event: Mapping[str, jax.Array], state: tuple[LSTMState, ...],
           recurrent: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[LSTMState, ...]]:
    """The top layer's output [batch, hidden] and every layer's new state after one event per row (`event`
    [batch]), given the states and their `recurrent_terms`: the same LSTM as `features`, one position as the
    textbook cell. The sampler computes the next recurrent terms beside its draws, where on two CPU cores
    they run while the heads wait on each other's draws."""
    gate_inputs = self.input_projection(event)
    new_state = []
    for layer, layer_state, term in zip(self.lstm, state, recurrent):
      if new_state:
        gate_inputs = layer.project(new_state[-1].h)
      new_state.append(cell_update(gate_inputs + term, layer_state.c))
    return new_state[-1].h, tuple(new_state)

  def cudnn_features(self, inputs: Mapping[str, jax.Array],
                     state: tuple[LSTMState, ...]) -> tuple[jax.Array, tuple[LSTMState, ...]]:
    """`features` by one cuDNN call over the whole stack, which reads the batch-major inputs themselves."""
    x = self.embed(inputs["pitch"])
    extra = self.extra_inputs(inputs)
    if extra is not None:
      x = jnp.concatenate([x, extra.astype(x.dtype)], -1)
    outputs, h, c = cudnn_lstm.lstm(x, jnp.stack([s.h for s in state]), jnp.stack([s.c for s in state]),
                                    [layer.weights() for layer in self.lstm])
    return swap_batch_time(outputs), tuple(LSTMState(*layer_final) for layer_final in zip(h, c))

  def head_modules(self) -> dict[str, Head]:
    return {"pitch": self.pitch_head, "time": self.time_head, "velocity": self.velocity_head}

  def head_logits(self, name: str, features: jax.Array, before: Mapping[str, jax.Array],
                  held: HeldTerms | None = None, *, isolate_heads: bool, rngs: nnx.Rngs | None,
                  controls: Mapping[str, jax.Array] | None = None, first_layer: jax.Array | None = None
                  ) -> jax.Array:
    """The output of sub-event `name`'s head from the features [..., hidden], the classes [...] of the
    sub-events before it in `self.order` (`before` may hold more; only those are read) and, for heads
    that read them, the held pitches (`read_held`), once the event's pitch is drawn, that pitch's age
    (none for an onset), and the `controls` ({name: [...]}); `first_layer` as `Head` takes it."""
    head = self.head_modules()[name]
    x = jax.lax.stop_gradient(features) if isolate_heads and name != "pitch" else features
    conditions = tuple(before[b] for b in self.order[:self.order.index(name)]) if head.conditions else ()
    own = None
    if head.own is not None:
      own = held.pitch_age(before["pitch"])
    return head(x, rngs=rngs, conditions=conditions, held=held if head.census is not None else None, own=own,
                controls=controls, first_layer=first_layer)

  def first_layers(self, features: jax.Array) -> dict[str, jax.Array]:
    """Each head's first layer (its weights and bias) applied to `features` [..., hidden], all heads in one
    matmul: the sampler's heads run one after another, and these are the part that none of the draws
    before a head changes (about 2% more events/s at B = 64 on two CPU cores)."""
    heads = [self.head_modules()[name].hidden[0] for name in self.order]
    kernel = jnp.concatenate([layer.kernel.value.astype(layer.dtype) for layer in heads], 1)
    bias = jnp.concatenate([layer.bias.value.astype(layer.dtype) for layer in heads])
    out = dense(features.astype(heads[0].dtype), kernel) + bias
    return dict(zip(self.order, jnp.split(out, len(heads), axis=-1)))

  @property
  def reads_held(self) -> bool:
    """Whether the heads read which pitches sound (distribution heads over velocity-reading inputs)."""
    return self.pitch_head.census is not None

  def heads(self, features: jax.Array, targets: Mapping[str, jax.Array] | None = None,
            held: jax.Array | None = None, controls: Mapping[str, jax.Array] | None = None, *, isolate_heads: bool,
            rngs: nnx.Rngs | None) -> dict[str, jax.Array]:
    """The heads' outputs at every position of `features`: `pitch_logits` and, in regression mode, `dt`
    (seconds) and `velocity` (/127), in distribution mode `time_logits` and `velocity_logits`, each head
    reading the `targets` classes (time-major, like the features) before it, and the `controls`."""
    side = {"isolate_heads": isolate_heads, "rngs": rngs, "controls": controls}
    if self.head_mode == "regression":
      return {"pitch_logits": self.head_logits("pitch", features, {}, **side),
              "dt": self.head_logits("time", features, {}, **side)[..., 0],
              "velocity": self.head_logits("velocity", features, {}, **side)[..., 0]}
    if targets is None:
      raise ValueError("distribution heads need the targets to read: pass targets, or draw with sampling")
    before = distributions.classes(targets, self.time_bins)
    held = read_held(held) if self.reads_held else None
    return {f"{name}_logits": self.head_logits(name, features, before, held, **side) for name in self.order}

  def __call__(self, inputs: Mapping[str, jax.Array], state: tuple[LSTMState, ...] | None = None, *,
               targets: Mapping[str, jax.Array] | None = None, held: jax.Array | None = None,
               isolate_heads: bool = True, rngs: nnx.Rngs | None = None, time_major: bool = False
               ) -> tuple[dict[str, jax.Array], tuple[LSTMState, ...]]:
    """Predicts the next event at every position of `inputs` [batch, time]; dropout only with `rngs`.
    Distribution heads read the next events `targets` [batch, time] (teacher forcing) and, where
    `reads_held`, the pitches held after each input (`held_pitches`), from those held before the first
    (`held` [batch, 128], default silence: a window of a piece's middle starts with notes held). Outputs are
    [batch, time, ...], or with `time_major` [time, batch, ...] as the heads compute them: the losses read
    them so, and no logits are transposed. A conditioned model reads its controls from `inputs`, by default the
    window's own (`window_controls`), broadcast to every position."""
    inputs = self.with_controls(inputs, targets, held)
    if state is None:
      state = self.initial_state(inputs["pitch"].shape[0])
    features, final = self.features(inputs, state)
    outputs = self.window_outputs(features, inputs, targets, held, isolate_heads=isolate_heads, rngs=rngs)
    return (outputs if time_major else swap_batch_time(outputs)), final

  def with_controls(self, inputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array] | None,
                    held: jax.Array | None) -> Mapping[str, jax.Array]:
    """`inputs` [batch, time] with each control this model reads and they lack: the window's own
    (`window_controls` of `inputs`, `targets` and `held`), broadcast to every position."""
    missing = tuple(name for name in self.controls if name not in inputs)
    if not missing:
      return inputs
    if targets is None:
      raise ValueError(f"a conditioned model needs inputs[{missing[0]!r}] or the targets to compute it from")
    return {**inputs, **{name: jnp.broadcast_to(value[:, None], inputs["pitch"].shape)
                         for name, value in window_controls(missing, inputs, targets, held).items()}}

  def window_outputs(self, features: jax.Array, inputs: Mapping[str, jax.Array],
                     targets: Mapping[str, jax.Array] | None, held: jax.Array | None, *, isolate_heads: bool,
                     rngs: nnx.Rngs | None) -> dict[str, jax.Array]:
    """The heads' outputs, time-major [time, batch, ...], over a window from the LSTM's time-major `features`
    and the window's `inputs`, `targets` and `held` as `__call__` takes them."""
    if targets is not None:
      targets = swap_batch_time(dict(targets))
    if self.reads_held:
      time_major = swap_batch_time((inputs["pitch"], inputs["dt"], inputs["velocity"]))
      held = held_pitches(*time_major, held, time_major=True)
    controls = {name: swap_batch_time(inputs[name]) for name in self.controls}
    return self.heads(features, targets, held, controls, isolate_heads=isolate_heads, rngs=rngs)
