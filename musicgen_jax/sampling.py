"""The sampler: one jitted `lax.scan` that carries every LSTM layer's state and samples B sequences at once
(pure: no files; `generate` writes them).

Each step feeds the previous event (one position) to the model from the carried state, draws the next
event and feeds it back, so a step costs one position whatever the length (the original re-ran a
256-event window). With distribution heads, which run one after another, the carry also holds each
layer's recurrent term for the next step (`MusicLSTM.step`), computed from the new state beside the
draws; regression heads run side by side and keep the window's recurrence. The loop carries which
pitches sound and since when (`models.held_pitches`), so that a release always names a sounding pitch
and an onset a silent one:
  * distribution heads (`draw_event`): every sub-event is drawn from its head in the model's order,
    each head reading those drawn before it, restricted by `allowed_classes`; the pitch with
    temperature, top-k and top-p, time and velocity with temperatures of their own;
  * regression heads (`next_event`): onset or release is decided by the predicted velocity against
    `sample.release_threshold`, then the pitch is drawn among the sounding pitches for a release and
    the silent ones for an onset; dt and velocity are the heads' point predictions.

Every sequence starts from a batch-1 `(state, event)` broadcast to the batch:
  * without a primer, the zero state and START_EVENT, a release of middle C at dt 0. Training windows
    start anywhere in a piece from the zero state, so "zero state, then one event" is a situation the
    model has seen; a release sounds nothing and needs no matching note-off, and dt 0 adds no silence.
    It is an input only: files hold the generated events, never the start event.
  * with a primer of P events, the state after the first P - 1 (one model call over them, no loop)
    and the primer's last event, so the first generated event continues the primer.

Sequence i of a call draws from `fold_in(key(seed), i)` and step t of it from `fold_in(that, t)`, so
the same arguments write the same bytes. Another batch size draws the same random numbers, but the
matmuls of another shape may round differently, which can change a file. The controls a conditioned model
draws are stratified over the set of sequences (`sequence_controls`): the same seed and set size, the same
controls.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from musicgen_jax import distributions, models, store
from musicgen_jax.errors import UserError

START_EVENT = {"pitch": 60, "dt": 0.0, "velocity": 0.0}  # A release of middle C at dt 0.
# Folded into a sequence's key for its draw of each control (density, polyphony), and into the seed's key for the
# order of the set's slices (`sequence_controls`); step and sequence numbers stay below them.
CONTROL_STREAMS = {"density": 2**31 - 1, "polyphony": 2**31 - 2}
CONTROL_OPTIONS = {"density": "--notes-per-second", "polyphony": "--polyphony"}  # How `generate` sets each.

Event = dict[str, jax.Array]  # pitch int32, dt float32 seconds, velocity float32 MIDI units; [batch] or [batch, time].
State = tuple[models.LSTMState, ...]


class Settings(NamedTuple):
  """Sampling values traced into the compiled loop, so changing one never recompiles it."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  max_dt: jax.Array
  release_threshold: jax.Array
  time_temperature: jax.Array
  velocity_temperature: jax.Array


# The model's own distribution, unfiltered: how runs saved before the `sample.*` sampling settings draw.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "time_temperature": 1.0,
                     "velocity_temperature": 1.0}


def make_settings(config: ml_collections.ConfigDict, *, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, time_temperature: float | None = None,
                  velocity_temperature: float | None = None) -> Settings:
  """Settings from a run's config and the sampling options that override it (None: the run's `sample.*`
  value): `sample.max_dt`, and `sample.release_threshold`, which only regression heads read."""
  threshold = config.sample.release_threshold
  if threshold is None and config.model.heads == "regression":
    raise UserError("the run's config.json has no sample.release_threshold (training sets it): "
                    "add one, e.g. 32, to its \"sample\" section")
  given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "time_temperature": time_temperature,
           "velocity_temperature": velocity_temperature}
  value = {name: config.sample.get(name, default) if given[name] is None else given[name]
           for name, default in SAMPLING_DEFAULTS.items()}
  return Settings(jnp.float32(value["temperature"]), jnp.int32(value["top_k"]), jnp.float32(value["top_p"]),
                  jnp.float32(config.sample.max_dt), jnp.float32(0.0 if threshold is None else threshold),
                  jnp.float32(value["time_temperature"]), jnp.float32(value["velocity_temperature"]))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Sets to -inf the logits [..., V] outside the top `top_k` (0: off) or outside the nucleus of mass `top_p`.

  The nucleus is taken over the top-k distribution: the likeliest pitches whose mass before them is
  below `top_p` (so the likeliest always stays). Ties with the last kept pitch stay too. Both cuts are
  thresholds on the probabilities found by bisection (`largest_threshold`), not by a sort, which cost
  a fifth of the sampler's time on a CPU; nothing is computed when both filters are off.
  """

  def filtered(logits: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits, axis=-1)
    keys = jax.lax.bitcast_convert_type(probs, jnp.int32)  # Ordered as the probabilities: they are >= 0.
    least = jax.lax.cond(top_k > 0, lambda: largest_threshold(keys, jnp.ones_like(probs), top_k),
                         lambda: jnp.zeros(keys.shape[:-1] + (1,), jnp.int32))
    above, in_top_k = keys > least, keys >= least
    # The top-k distribution's mass: k classes, however many more tie with the k-th (of probability `least`).
    tied = top_k - jnp.sum(above, axis=-1, keepdims=True)
    k_classes = jnp.sum(jnp.where(above, probs, 0.0), axis=-1, keepdims=True) + tied * jax.lax.bitcast_convert_type(
        least, jnp.float32)
    top_k_mass = jnp.where(top_k > 0, k_classes, jnp.sum(probs, axis=-1, keepdims=True))
    mass = jnp.where(in_top_k, probs, 0.0) / top_k_mass
    in_nucleus = (keys >= largest_threshold(keys, mass, top_p)) | (top_p >= 1.0)
    return jnp.where(in_top_k & in_nucleus, logits, -jnp.inf)

  return jax.lax.cond((top_k > 0) | (top_p < 1.0), filtered, lambda x: x, logits)


def largest_threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
  """The largest t [..., 1] whose `keys` [..., V] (nonnegative int32) at or above it have `weights` summing to
  at least `target` (0 where none do), one bit at a time from the highest (keys of probabilities, at most
  1.0, have 30 bits): with probabilities' bits as keys and the probabilities as weights, the least
  probability of the nucleus; with weights 1, of the top k."""

  def halve(bit: jax.Array, threshold: jax.Array) -> jax.Array:
    candidate = threshold | jnp.left_shift(jnp.int32(1), 29 - bit)
    passes = jnp.sum(jnp.where(keys >= candidate, weights, 0.0), axis=-1, keepdims=True) >= target
    return jnp.where(passes, candidate, threshold)

  return jax.lax.fori_loop(0, 30, halve, jnp.zeros(keys.shape[:-1] + (1,), jnp.int32))


def categorical(uniforms: jax.Array, logits: jax.Array) -> jax.Array:
  """One index per row of `logits` [B, V] by inverting its cumulative distribution at `uniforms` [B] in [0, 1).

  One random number per row where `jax.random.categorical` draws V (Gumbel noise). The inversion runs in two
  levels, blocks of about sqrt(V) classes and then the classes of the block drawn, so that the cumulative
  sums run over about sqrt(V) values twice instead of V once: a third of the time for the 401 time classes
  on a CPU, where the sums' many small steps, not their arithmetic, cost. A class of probability 0 (logit
  -inf) is never drawn (`first_passing`).
  """
  rows, count = logits.shape
  size = 1 << math.ceil(math.log2(math.sqrt(count)))  # Classes per block.
  blocks = -(-count // size)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # Unnormalised: the point scales instead.
  weights = jnp.pad(weights, ((0, 0), (0, blocks * size - count))).reshape(rows, blocks, size)
  block_weights = jnp.sum(weights, axis=-1)
  # An associative scan: on a CPU `jnp.cumsum` is a reduce-window, two to three times slower at these sizes.
  block_cumulative = jax.lax.associative_scan(jnp.add, block_weights, axis=-1)
  point = uniforms * block_cumulative[:, -1]
  block = first_passing(block_weights, block_cumulative, point)
  at_block = lambda values: jnp.take_along_axis(values, block[:, None], axis=1)[:, 0]
  inner = jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0]
  inner_point = point - (at_block(block_cumulative) - at_block(block_weights))
  return block * size + first_passing(inner, jax.lax.associative_scan(jnp.add, inner, axis=-1), inner_point)


def first_passing(weights: jax.Array, cumulative: jax.Array, point: jax.Array) -> jax.Array:
  """The first index [B] of nonzero `weights` [B, V] whose `cumulative` sum passes `point` [B], or, where
  rounding leaves none, the last of nonzero weight: never one of weight 0, although the scan's rounding leaves
  the sums a few ulps out of order often enough that counting the sums below the point landed on one about
  once in four million draws of half-masked rows."""
  count, indices = weights.shape[-1], jnp.arange(weights.shape[-1])
  # One minimum over ranks that put the passing indices first, then the others from the last (XLA:CPU's
  # argmax, a reduction of pairs, costs several times as much).
  rank = jnp.where(weights > 0, jnp.where(cumulative > point[:, None], indices, 2 * count - indices), 2 * count)
  smallest = jnp.min(rank, axis=-1)
  return jnp.where(smallest < count, smallest, 2 * count - smallest)


def sample_pitch(uniforms: jax.Array, logits: jax.Array, settings: Settings) -> jax.Array:
  """One pitch per row of `logits` [B, 128], each row drawn at its own uniform of `uniforms` [B]."""
  logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
  return categorical(uniforms, logits).astype(jnp.int32)


def decode_velocity(predicted: jax.Array, release_threshold: jax.Array) -> jax.Array:
  """MIDI velocity from the head's output (/127): rounded into 0-127, 0 (a release) below the threshold."""
  velocity = predicted * models.MAX_VELOCITY
  return jnp.where(velocity < release_threshold, 0.0, jnp.clip(jnp.round(velocity), 0.0, models.MAX_VELOCITY))


def next_event(outputs: Mapping[str, jax.Array], keys: jax.Array, settings: Settings,
               sounding: jax.Array | None = None) -> Event:
  """The event drawn from one position's outputs (`pitch_logits` [B, 128], `dt` [B], `velocity` [B]).

  `sounding` [B, 128] (default: nothing sounds) restricts a release to the sounding pitches and an
  onset to the silent ones; a release with nothing sounding becomes an onset at the threshold velocity.
  """
  velocity = decode_velocity(outputs["velocity"], settings.release_threshold)
  if sounding is None:
    sounding = jnp.zeros(outputs["pitch_logits"].shape, bool)
  release = (velocity == 0) & jnp.any(sounding, axis=-1)
  allowed = jnp.where(release[:, None], sounding, ~sounding)
  allowed |= ~jnp.any(allowed, axis=-1, keepdims=True)
  onset_velocity = jnp.maximum(velocity, jnp.clip(jnp.ceil(settings.release_threshold), 1.0, models.MAX_VELOCITY))
  return {
      "pitch": sample_pitch(uniform(keys), jnp.where(allowed, outputs["pitch_logits"], -jnp.inf), settings),
      "dt": jnp.clip(outputs["dt"], 0.0, settings.max_dt),
      "velocity": jnp.where(release, 0.0, onset_velocity),
  }


def allowed_classes(name: str, drawn: Mapping[str, jax.Array], sounding: jax.Array, count: int) -> jax.Array:
  """Which classes [B, count] sub-event `name` may take after the sub-events `drawn` of its event, so that a
  release names a sounding pitch and an onset a silent one: a pitch drawn after the velocity is among the
  sounding pitches for a release and the silent ones for an onset; a velocity drawn after the pitch is a
  release exactly when that pitch sounds; a velocity drawn first is a release only if some pitch sounds
  and an onset only if some pitch is silent."""
  rows = jnp.arange(sounding.shape[0])
  if name == "pitch" and "velocity" in drawn:
    return jnp.where((drawn["velocity"] == 0)[:, None], sounding, ~sounding)
  if name == "velocity":
    release = (jnp.arange(count) == 0)[None]
    if "pitch" in drawn:
      return release == sounding[rows, drawn["pitch"]][:, None]
    return jnp.where(release, jnp.any(sounding, -1, keepdims=True), jnp.any(~sounding, -1, keepdims=True))
  return jnp.ones((sounding.shape[0], count), bool)


def draw_event(model: models.MusicLSTM, features: jax.Array, keys: jax.Array, settings: Settings,
               held: jax.Array, controls: Mapping[str, jax.Array] | None = None) -> Event:
  """The event drawn by distribution heads from one position's features [B, hidden], the pitches held
  [B, 128] and the controls ({name: [B]}, a conditioned model's): each sub-event in the model's order from its
  head given those drawn before it (see
  `allowed_classes`), pitch with temperature, top-k and top-p, time and velocity with their own
  temperatures (`draw_dt`)."""
  sounding = held >= 0
  held_terms = models.read_held(held) if model.reads_held else None
  sub_keys = jax.vmap(lambda key: jax.random.split(key, len(model.order) + 1))(keys)
  drawn, first_layers = {}, model.first_layers(features)
  for i, name in enumerate(model.order):
    logits = model.head_logits(name, features, drawn, held_terms, isolate_heads=False, rngs=None, controls=controls,
                               first_layer=first_layers[name])
    if name == "time":
      tempered = distributions.temper_time(logits, settings.time_temperature, model.time_bins)
      dt = draw_dt(sub_keys[:, i], sub_keys[:, -1], tempered, model.time_bins)
      drawn[name] = distributions.time_class(dt, model.time_bins)
      continue
    logits = jnp.where(allowed_classes(name, drawn, sounding, logits.shape[-1]), logits, -jnp.inf)
    if name == "pitch":
      drawn[name] = sample_pitch(uniform(sub_keys[:, i]), logits, settings)
    else:
      drawn[name] = categorical(uniform(sub_keys[:, i]), logits / settings.velocity_temperature).astype(jnp.int32)
  return {"pitch": drawn["pitch"], "dt": jnp.minimum(dt, settings.max_dt),
          "velocity": drawn["velocity"].astype(jnp.float32)}


def draw_dt(keys: jax.Array, value_keys: jax.Array, outputs: jax.Array, bins: distributions.TimeBins) -> jax.Array:
  """dt in seconds [B] drawn from the time head's `outputs` [B, bins.outputs] with `keys` and `value_keys` [B]:
  a categorical's class, then dt uniform inside its bin; a mixture's dt = 0 or a logistic, then dt from
  that logistic (longer than the last bin: its upper edge)."""
  if not bins.mixture:
    return distributions.dt_of_class(categorical(uniform(keys), outputs), uniform(value_keys), bins)
  zero_logit, weights, location, inverse_scale = distributions.mixture_parameters(outputs)
  rows = jnp.arange(outputs.shape[0])
  component = categorical(uniform(keys), weights)
  zero_draw, logistic_draw = jax.vmap(lambda key: jax.random.uniform(key, (2,), minval=1e-7, maxval=1 - 1e-7))(
      value_keys).T
  log_dt = location[rows, component] + (jnp.log(logistic_draw) - jnp.log1p(-logistic_draw)) / inverse_scale[
      rows, component]
  dt = jnp.clip(jnp.exp(log_dt), distributions.EDGE_MARGIN * bins.width, bins.max_dt)
  return jnp.where(zero_draw < jax.nn.sigmoid(zero_logit), 0.0, dt)


def control_value(name: str, value: Any) -> jax.Array:
  """Control `name` of a value (any shape) in its units: notes per second, notes sounding at once."""
  return models.density_control(value, 1.0) if name == "density" else models.polyphony_control(value)


def sequence_controls(config: ml_collections.ConfigDict, seed: int, first: int, count: int, total: int | None = None,
                      given: Mapping[str, float | None] | None = None) -> dict[str, jax.Array] | None:
  """The controls ({name: [count]}) of sequences first, ..., first + count - 1 of a set of `total` (default `count`)
  drawn with `seed`, for a conditioned run (None for another): each `given` value (in its units, see
  `control_value`) for every sequence, or else a draw from the run's `sample.<control>_quantiles` (between two
  quantiles, log-linear) stratified over the set: its `total` sequences take one each of `total` equal slices of
  the distribution, in an order drawn from the seed (its own for each control), each at a point drawn with the
  sequence's key inside its slice. Each sequence on its own is a draw from the training pieces' values, and a set
  spreads over their range as evenly as its size allows, where independent draws would clump by chance (the
  mean density of 64 such draws ran from 7% below to 7% above the pieces', 5th to 95th percentile of 1,000 seeds)."""
  names = models.controls_of(config.model)
  if not names:
    return None
  total = count if total is None else total
  indices = jnp.arange(first, first + count)
  keys = sequence_keys(seed, first, count)
  controls = {}
  for name in names:
    value = (given or {}).get(name)
    if value is not None:
      controls[name] = jnp.full((count,), control_value(name, value))
      continue
    quantiles = np.asarray(config.sample.get(f"{name}_quantiles") or (), np.float64)
    if quantiles.size < 2:
      raise UserError(f"the run's config.json has no sample.{name}_quantiles (training sets them): pass "
                      f"{CONTROL_OPTIONS[name]}, or add them to its \"sample\" section")
    stream = CONTROL_STREAMS[name]
    # Rows past the set (a padded last batch, never written) reuse slices of the set.
    slices = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), stream), total)[indices % total]
    points = (slices + uniform(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, stream))) / total
    controls[name] = control_value(
        name, jnp.exp(jnp.interp(points, jnp.linspace(0.0, 1.0, quantiles.size), jnp.log(jnp.asarray(quantiles)))))
  return controls


def uniform(keys: jax.Array) -> jax.Array:
  """One uniform in [0, 1) [B] from each key of `keys` [B]."""
  return jax.vmap(jax.random.uniform)(keys)


def update_held(held: jax.Array, event: Event) -> jax.Array:
  """The pitches held [B, 128] after `event` ([B]; see `models.held_pitches`): its dt passes for every
  sounding pitch, then an onset starts its pitch and a release ends it."""
  held = jnp.where(held >= 0, held + event["dt"][:, None], models.SILENT)
  return held.at[jnp.arange(held.shape[0]), event["pitch"]].set(jnp.where(event["velocity"] > 0, 0.0, models.SILENT))


def held_after(events: Event) -> jax.Array:
  """The pitches held [B, 128] at the end of event streams [B, T] that start in silence."""
  return models.held_pitches(events["pitch"], events["dt"], events["velocity"])[:, -1]


def step_keys(keys: jax.Array, step: jax.Array | int) -> jax.Array:
  """The keys [B] of one step: each sequence's key folded with the step number."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


def sequence_keys(seed: int, first: int, count: int) -> jax.Array:
  """The keys of sequences first, ..., first + count - 1 of a seed."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(first, first + count))


def as_inputs(events: store.Events) -> Event:
  """A stored event stream as a batch-1 model input [1, T]."""
  return {"pitch": jnp.asarray(events.pitch, jnp.int32)[None],
          "dt": jnp.asarray(events.dt, jnp.float32)[None],
          "velocity": jnp.asarray(events.velocity, jnp.float32)[None]}


def start(model: models.MusicLSTM) -> tuple[State, Event]:
  """The batch-1 zero state and START_EVENT, where sequences without a primer begin."""
  event = {k: jnp.asarray([v], jnp.int32 if k == "pitch" else jnp.float32) for k, v in START_EVENT.items()}
  return model.initial_state(1), event


def prime(model: models.MusicLSTM, primer: Event, controls: Mapping[str, jax.Array] | None = None
          ) -> tuple[State, Event]:
  """The state after all but the last event of `primer` [B, P] (one model call) and that last event; a
  conditioned model reads them at its `controls` ({name: [B]}, `controls_or_reference`)."""
  inputs = jax.tree.map(lambda x: x[:, :-1], primer)
  inputs.update({name: jnp.broadcast_to(value[..., None], inputs["pitch"].shape)
                 for name, value in controls_or_reference(model, controls).items()})
  _, state = model.features(inputs, model.initial_state(primer["pitch"].shape[0]))
  return state, jax.tree.map(lambda x: x[:, -1], primer)


def primer_controls(names: tuple[str, ...], primer: Event) -> dict[str, jax.Array]:
  """The controls `names` ({name: [B]}) of primers [B, P] that start in silence, measured as a training window's
  (`models.window_controls`)."""
  return models.window_controls(names, jax.tree.map(lambda x: x[:, :-1], primer),
                                jax.tree.map(lambda x: x[:, 1:], primer))


def controls_or_reference(model: models.MusicLSTM, controls: Mapping[str, jax.Array] | None) -> dict[str, jax.Array]:
  """The controls `model` reads, as float32: each of `controls`, or where absent 0, the control of its reference
  (`models.DENSITY_REFERENCE` notes per second, `models.POLYPHONY_REFERENCE` notes at once): what a conditioned
  model plays at unless told (`generate` always tells it)."""
  controls = controls or {}
  return {name: jnp.asarray(controls.get(name, 0.0), jnp.float32) for name in model.controls}


def sample(model: models.MusicLSTM, state: State, event: Event, keys: jax.Array, settings: Settings,
           length: int, held: jax.Array | None = None, first_step: jax.Array | int = 0,
           controls: Mapping[str, jax.Array] | None = None) -> tuple[Event, tuple[State, Event, jax.Array]]:
  """`length` events [B, length] for each key of `keys` [B], continuing `event` from `state` (batch 1 or B)
  with the pitches `held` [1 or B, 128] (default: silence; see `models.held_pitches`), and the carry
  (state, last event, held pitches) to continue from. Steps are numbered from `first_step`: a continuation from
  the carry with `first_step=length` draws what one call of twice the length would. A conditioned model
  plays at the `controls` ({name: [1 or B]}) of each sequence throughout (`controls_or_reference`).
  """
  batch = keys.shape[0]
  if held is None:
    held = jnp.full((1, models.NUM_PITCHES), models.SILENT)
  state, event, held = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape[1:])), (state, event, held))
  control = {name: jnp.broadcast_to(value, (batch,)) for name, value in controls_or_reference(model, controls).items()}

  Carry = tuple[State, tuple[jax.Array, ...], Event, jax.Array]

  def step(carry: Carry, t: jax.Array) -> tuple[Carry, Event]:
    state, recurrent, event, held = carry
    event = {**event, **control}
    if model.head_mode == "regression":
      outputs, state = model(jax.tree.map(lambda x: x[:, None], event), state)
      event = next_event(jax.tree.map(lambda x: x[:, 0], outputs), step_keys(keys, t), settings, held >= 0)
    else:
      features, state = model.step(event, state, recurrent)
      event = draw_event(model, features, step_keys(keys, t), settings, held, control)
      recurrent = model.recurrent_terms(state)
    return (state, recurrent, event, update_held(held, event)), event

  recurrent = () if model.head_mode == "regression" else model.recurrent_terms(state)
  (state, _, event, held), events = jax.lax.scan(step, (state, recurrent, event, held),
                                                 jnp.arange(length) + first_step)
  return jax.tree.map(lambda x: x.T, events), (state, event, held)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prime_compiled(graphdef: nnx.GraphDef, params: nnx.State, primer: Event | None,
                   controls: Mapping[str, jax.Array] | None = None) -> tuple[State, Event]:
  """`prime` (or `start` when `primer` is None) of the model `graphdef` with `params`."""
  model = nnx.merge(graphdef, params)
  return start(model) if primer is None else prime(model, primer, controls)


@functools.partial(jax.jit, static_argnames=("graphdef", "length"))
def sample_compiled(graphdef: nnx.GraphDef, params: nnx.State, state: State, event: Event, keys: jax.Array,
                    settings: Settings, length: int, held: jax.Array | None = None, first_step: jax.Array | int = 0,
                    controls: Mapping[str, jax.Array] | None = None
                    ) -> tuple[Event, tuple[State, Event, jax.Array]]:
  """`sample` of the model `graphdef` with `params`: compiled once per (batch, length, model)."""
  return sample(nnx.merge(graphdef, params), state, event, keys, settings, length, held, first_step, controls)


def device_placement(batch: int) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-sharded) placements over every device when they divide `batch`, else one device."""
  devices = jax.devices()
  mesh = Mesh(np.asarray(devices if batch % len(devices) == 0 else devices[:1]), ("data",))
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def to_events(batch: Mapping[str, np.ndarray], row: int) -> store.Events:
  """Row `row` of a sampled batch [B, length] as a stored event stream."""
  return store.Events(*(np.asarray(batch[f][row]).astype(store.DTYPES[f]) for f in store.FIELDS))
