"""The three heads' losses and the metrics reported for them, as weighted per-event sums that add up
exactly across batches, steps and hosts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from musicgen_jax import models

HEADS = ("pitch", "time", "velocity")  # The model's heads, each with its loss and its own optimizer.
# How the time and velocity losses reach the LSTM: not at all (`strict`), or summed with the pitch loss (`joint`).
ISOLATION_MODES = ("strict", "joint")
SUMS = ("events", "pitch_nll", "pitch_correct", "dt_abs_error", "velocity_sq_error")


def position_weights(window: int, predict_last: int) -> jax.Array:
  """Which positions of a window are scored: all, or only the last `predict_last` as the original."""
  positions = jnp.arange(window)
  return (positions >= window - predict_last if predict_last > 0 else positions >= 0).astype(jnp.float32)


def event_sums(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
               weights: jax.Array) -> dict[str, jax.Array]:
  """Weighted per-event sums of every loss and metric, so batches and hosts add up exactly."""
  log_probs = jax.nn.log_softmax(outputs["pitch_logits"])
  target_pitch = targets["pitch"].astype(jnp.int32)
  nll = -jnp.take_along_axis(log_probs, target_pitch[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(log_probs, axis=-1) == target_pitch).astype(jnp.float32)
  dt_error = jnp.abs(outputs["dt"] - targets["dt"])
  velocity_error = jnp.square(outputs["velocity"] - targets["velocity"] / models.MAX_VELOCITY)
  weighted = lambda x: jnp.sum(x * weights)
  return {
      "events": jnp.sum(weights * jnp.ones_like(nll)),
      "pitch_nll": weighted(nll),
      "pitch_correct": weighted(correct),
      "dt_abs_error": weighted(dt_error),
      "velocity_sq_error": weighted(velocity_error),
  }


def losses_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The training loss of each head (means per scored event) from `event_sums`."""
  events = jnp.maximum(sums["events"], 1.0)
  return {"pitch": sums["pitch_nll"] / events, "time": sums["dt_abs_error"] / events,
          "velocity": sums["velocity_sq_error"] / events}


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Readable metrics from summed counts: NLL in nats/event, accuracy, dt MAE in ms, velocity RMSE in MIDI units."""
  events = max(float(sums["events"]), 1.0)
  return {
      "pitch_nll": float(sums["pitch_nll"]) / events,
      "pitch_accuracy": float(sums["pitch_correct"]) / events,
      "dt_mae_ms": 1000.0 * float(sums["dt_abs_error"]) / events,
      "velocity_rmse": models.MAX_VELOCITY * math.sqrt(float(sums["velocity_sq_error"]) / events),
      "events": int(round(float(sums["events"]))),
  }


def zero_metrics() -> dict[str, jax.Array]:
  """The empty on-device accumulator that a train step adds each step's sums into."""
  sums = {k: jnp.zeros((), jnp.float32) for k in (*SUMS, "steps")}
  sums.update({f"loss_{k}": jnp.zeros((), jnp.float32) for k in HEADS})
  sums.update({f"first_nonfinite_{k}": jnp.full((), -1, jnp.int32) for k in HEADS})
  return sums
