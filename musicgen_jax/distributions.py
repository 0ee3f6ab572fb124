"""The classes of the "distribution" heads and the exact likelihoods on them.

Each sub-event of an event is scored on classes: the pitch (128 classes), the velocity (128 classes,
class 0 a release) and dt in time bins. Time class 0 is dt exactly 0, the point mass of chords and of
releases under one pedal lift; class k >= 1 is the interval ((k - 1) * bin, k * bin] seconds and the
last class also holds every longer gap (censored at `dt_max`). Pitch and velocity are categorical.
dt is categorical too (generation draws it uniformly inside its bin), or with `model.time_mixture=K`
a point mass at 0 and a mixture of K logistics over log dt, whose mass on each bin is the class's
probability (generation draws dt from the mixture itself). Either way the model is a proper
distribution over seconds at the bins' resolution, and both score the same classes.

The point heads of `"regression"` mode get likelihoods on the same classes, so both modes compare on
one scale: dt as a Laplace around the predicted dt (mass below 0 on class 0, above the last edge on
the last class) and velocity as a Gaussian around the predicted velocity, rounded to the nearest
integer; each with the scale fitted on the data it is scored on.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.special import log_ndtr

NUM_VELOCITIES = 128  # Velocity classes 0 (a release) to 127.
MAX_VELOCITY = 127.0
SUB_EVENTS = ("pitch", "velocity", "time")


class TimeBins(NamedTuple):
  """Time classes: 0 is dt = 0, k >= 1 is ((k - 1) * width, k * width] seconds; `count` classes in all. The
  time head scores them as a categorical (`mixture` 0) or as a mixture of `mixture` logistics over log dt."""

  width: float
  count: int
  mixture: int = 0

  @property
  def max_dt(self) -> float:
    """The upper edge of the last bin: longer gaps are drawn as this long."""
    return (self.count - 1) * self.width

  @property
  def outputs(self) -> int:
    """The time head's outputs: a logit per class, or the mixture's dt = 0 logit and K weight logits,
    locations (log seconds) and log inverse scales."""
    return 1 + 3 * self.mixture if self.mixture else self.count


def time_bins(model_config: ml_collections.ConfigDict) -> TimeBins:
  """The time classes of a model config: `model.dt_bin` wide up to `model.dt_max` seconds, scored as
  `model.time_mixture` says (absent in runs saved before it: categorical)."""
  return TimeBins(float(model_config.dt_bin), 1 + math.ceil(round(model_config.dt_max / model_config.dt_bin, 6)),
                  int(model_config.get("time_mixture", 0)))


def time_class(dt: jax.Array, bins: TimeBins) -> jax.Array:
  """The time class of `dt` seconds: 0 for dt <= 0, else the bin holding it, longer gaps in the last."""
  return jnp.clip(jnp.ceil(dt / bins.width), 0, bins.count - 1).astype(jnp.int32)


EDGE_MARGIN = 1e-3  # Share of a bin kept clear at each edge by a drawn dt.


def dt_of_class(time_class_: jax.Array, uniform: jax.Array, bins: TimeBins) -> jax.Array:
  """dt in seconds drawn in a time class from `uniform` in [0, 1): exactly 0 for class 0. The draw keeps
  EDGE_MARGIN of the bin clear at each edge, so that the float32 dt reads back as its class (a dt on an
  edge may round into the next bin, and the heads drawn after the time would read another class than
  the file holds)."""
  inside = EDGE_MARGIN + (1.0 - 2.0 * EDGE_MARGIN) * uniform
  return jnp.where(time_class_ > 0, (time_class_ - inside) * bins.width, 0.0).astype(jnp.float32)


def velocity_class(velocity: jax.Array) -> jax.Array:
  """The velocity class of a velocity in MIDI units: rounded into 0-127, 0 a release."""
  return jnp.clip(jnp.round(velocity), 0, NUM_VELOCITIES - 1).astype(jnp.int32)


def classes(events: dict[str, jax.Array], bins: TimeBins) -> dict[str, jax.Array]:
  """Each sub-event's class of `events` (pitch, dt, velocity), keyed by sub-event name."""
  return {"pitch": events["pitch"].astype(jnp.int32), "velocity": velocity_class(events["velocity"]),
          "time": time_class(events["dt"], bins)}


def class_nll(logits: jax.Array, target: jax.Array) -> jax.Array:
  """-log p(target) under the categorical `logits` [..., V], in nats."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]


def time_nll(outputs: jax.Array, target_class: jax.Array, bins: TimeBins) -> jax.Array:
  """-log P(time class) under the time head's `outputs` [..., bins.outputs], in nats."""
  if not bins.mixture:
    return class_nll(outputs, target_class)
  zero_logit, weights, location, inverse_scale = mixture_parameters(outputs)
  k = target_class.astype(jnp.float32)
  # The first bin reaches down to 0 (log dt to -infinity) and the last up to infinity: their masses are one
  # tail each. Every edge computed is finite (an infinite one would make the scale's gradient NaN).
  lower = (jnp.log(jnp.maximum(k - 1.0, 1.0) * bins.width)[..., None] - location) * inverse_scale
  upper = (jnp.log(jnp.maximum(k, 1.0) * bins.width)[..., None] - location) * inverse_scale
  mass = jnp.where((target_class <= 1)[..., None], jax.nn.log_sigmoid(upper),
                   jnp.where((target_class == bins.count - 1)[..., None], jax.nn.log_sigmoid(-lower),
                             _interval_log_mass(jax.nn.log_sigmoid, lower, upper)))
  nonzero = jax.nn.log_sigmoid(-zero_logit) + jax.nn.logsumexp(jax.nn.log_softmax(weights) + mass, axis=-1)
  return -jnp.where(target_class == 0, jax.nn.log_sigmoid(zero_logit), nonzero)


MAX_LOG_SCALE = 7.0  # The mixture's logistics are no narrower than exp(-7) in log seconds.


def mixture_parameters(outputs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The time mixture's dt = 0 logit [...], weight logits, locations (log seconds) and inverse scales
  [..., K] from the time head's outputs [..., 1 + 3K]."""
  outputs = outputs.astype(jnp.float32)
  weights, location, log_inverse_scale = jnp.split(outputs[..., 1:], 3, axis=-1)
  return outputs[..., 0], weights, location, jnp.exp(jnp.minimum(log_inverse_scale, MAX_LOG_SCALE))


def temper_time(outputs: jax.Array, temperature: jax.Array, bins: TimeBins) -> jax.Array:
  """The time head's `outputs` [..., bins.outputs] at `temperature`: a categorical's logits divided by it; a
  mixture's dt = 0 logit and weight logits divided by it and its scales multiplied by it. Below 1 both
  draw the likeliest gaps more often; 1 leaves the model's distribution."""
  if not bins.mixture:
    return outputs / temperature
  logits, location, log_inverse_scale = jnp.split(outputs, [1 + bins.mixture, 1 + 2 * bins.mixture], axis=-1)
  return jnp.concatenate([logits / temperature, location, log_inverse_scale - jnp.log(temperature)], axis=-1)


def _log_diff(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
  """log(exp(log_a) - exp(log_b)) for log_a >= log_b, without cancellation when the two are close."""
  return log_a + jnp.log(-jnp.expm1(jnp.minimum(log_b - log_a, -1e-30)))


def _interval_log_mass(log_cdf, lower: jax.Array, upper: jax.Array) -> jax.Array:
  """log P(lower < X <= upper) of a symmetric distribution about 0 given its log CDF; -inf/inf edges allowed.

  Intervals above 0 are measured in the upper tail (log CDF of -x), where the CDF is close to 1.
  """
  upper_tail = lower > 0
  a = jnp.where(upper_tail, log_cdf(-lower), log_cdf(upper))
  b = jnp.where(upper_tail, log_cdf(-upper), log_cdf(lower))
  return _log_diff(a, b)


def _laplace_log_cdf(z: jax.Array) -> jax.Array:
  """log CDF of the standard Laplace distribution."""
  return jnp.where(z < 0, z - math.log(2.0), jnp.log1p(-0.5 * jnp.exp(-jnp.abs(z))))


def laplace_time_nll(predicted_dt: jax.Array, target_class: jax.Array, scale: jax.Array,
                     bins: TimeBins) -> jax.Array:
  """-log P(time class) of a Laplace(predicted_dt, scale) in seconds, censored at 0 and at the last bin."""
  k = target_class.astype(jnp.float32)
  lower = jnp.where(target_class == 0, -jnp.inf, (k - 1.0) * bins.width)
  upper = jnp.where(target_class == 0, 0.0, jnp.where(target_class == bins.count - 1, jnp.inf, k * bins.width))
  return -_interval_log_mass(_laplace_log_cdf, (lower - predicted_dt) / scale, (upper - predicted_dt) / scale)


def gaussian_velocity_nll(predicted_velocity: jax.Array, target_class: jax.Array, sigma: jax.Array) -> jax.Array:
  """-log P(velocity class) of a Gaussian(predicted_velocity, sigma) in MIDI units, rounded to the nearest
  class and censored at 0 and 127."""
  v = target_class.astype(jnp.float32)
  lower = jnp.where(target_class == 0, -jnp.inf, v - 0.5)
  upper = jnp.where(target_class == NUM_VELOCITIES - 1, jnp.inf, v + 0.5)
  return -_interval_log_mass(log_ndtr, (lower - predicted_velocity) / sigma, (upper - predicted_velocity) / sigma)
