"""The three heads' losses and the metrics reported for them, as weighted per-event sums that add up
exactly across batches, steps and hosts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from musicgen_jax import distributions, models

HEADS = ("pitch", "time", "velocity")  # The model's heads, each with its loss and its own optimizer.
# How the time and velocity losses reach the LSTM: not at all (`strict`), or summed with the pitch loss (`joint`).
ISOLATION_MODES = ("strict", "joint")
SUMS = {  # What a train step sums for each `model.heads`.
    "regression": ("events", "pitch_nll", "pitch_correct", "dt_abs_error", "velocity_sq_error"),
    "distribution": ("events", "pitch_nll", "pitch_correct", "time_nll", "velocity_nll", "seconds"),
}


def position_weights(window: int, predict_last: int) -> jax.Array:
  """Which positions of a window are scored: all, or only the last `predict_last` as the original."""
  positions = jnp.arange(window)
  return (positions >= window - predict_last if predict_last > 0 else positions >= 0).astype(jnp.float32)


def event_sums(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array], weights: jax.Array,
               time_bins: distributions.TimeBins | None = None,
               scales: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Weighted per-event sums of every loss and metric, so batches and hosts add up exactly. `outputs` and
  `targets` share one layout, batch- or time-major, which `weights` broadcasts against.

  Distribution heads (`time_logits`, `velocity_logits`; they need `time_bins`) sum the NLL of each
  sub-event's class. Regression heads (`dt`, `velocity`) sum their L1 and squared errors and, given the
  `scales` fitted to them (`dt` in seconds, `velocity` in MIDI units), the NLL of a Laplace and a
  Gaussian on the same classes (see `distributions`).
  """
  target_pitch = targets["pitch"].astype(jnp.int32)
  nll = distributions.class_nll(outputs["pitch_logits"], target_pitch)
  correct = (jnp.argmax(outputs["pitch_logits"], axis=-1) == target_pitch).astype(jnp.float32)
  weighted = lambda x: jnp.sum(x * weights)
  sums = {"events": jnp.sum(weights * jnp.ones_like(nll)), "pitch_nll": weighted(nll),
          "pitch_correct": weighted(correct)}
  if "time_logits" in outputs:
    target = distributions.classes(targets, time_bins)
    time_nll = distributions.time_nll(outputs["time_logits"], target["time"], time_bins)
    velocity_nll = distributions.class_nll(outputs["velocity_logits"], target["velocity"])
  else:
    sums["dt_abs_error"] = weighted(jnp.abs(outputs["dt"] - targets["dt"]))
    sums["velocity_sq_error"] = weighted(jnp.square(outputs["velocity"] - targets["velocity"] / models.MAX_VELOCITY))
    if scales is None:
      return sums
    target = distributions.classes(targets, time_bins)
    time_nll = distributions.laplace_time_nll(outputs["dt"], target["time"], scales["dt"], time_bins)
    velocity_nll = distributions.gaussian_velocity_nll(outputs["velocity"] * models.MAX_VELOCITY, target["velocity"],
                                                       scales["velocity"])
  sums.update(time_nll=weighted(time_nll), velocity_nll=weighted(velocity_nll), seconds=weighted(targets["dt"]))
  return sums


def losses_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The training loss of each head (means per scored event) from `event_sums`: each sub-event's NLL for
  distribution heads, L1 (dt) and squared error (velocity / 127) for regression heads."""
  events = jnp.maximum(sums["events"], 1.0)
  if "dt_abs_error" not in sums:
    return {name: sums[f"{name}_nll"] / events for name in HEADS}
  return {"pitch": sums["pitch_nll"] / events, "time": sums["dt_abs_error"] / events,
          "velocity": sums["velocity_sq_error"] / events}


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Readable metrics from summed counts: NLLs in nats/event and accuracy; for regression heads dt MAE in ms
  and velocity RMSE in MIDI units; where time and velocity NLLs are summed, the total NLL, also in bits per
  note (two events a note) and in bits per second of music."""
  events = max(float(sums["events"]), 1.0)
  metrics = {"pitch_nll": float(sums["pitch_nll"]) / events,
             "pitch_accuracy": float(sums["pitch_correct"]) / events}
  if "dt_abs_error" in sums:
    metrics["dt_mae_ms"] = 1000.0 * float(sums["dt_abs_error"]) / events
    metrics["velocity_rmse"] = models.MAX_VELOCITY * math.sqrt(float(sums["velocity_sq_error"]) / events)
  if "time_nll" in sums:
    total = float(sums["pitch_nll"]) + float(sums["time_nll"]) + float(sums["velocity_nll"])
    metrics.update(time_nll=float(sums["time_nll"]) / events, velocity_nll=float(sums["velocity_nll"]) / events,
                   total_nll=total / events, bits_per_note=2.0 * total / events / math.log(2.0),
                   bits_per_second=total / math.log(2.0) / max(float(sums["seconds"]), 1e-9))
  metrics["events"] = int(round(float(sums["events"])))
  return metrics


def zero_metrics(head_mode: str) -> dict[str, jax.Array]:
  """The empty on-device accumulator that a train step adds each step's sums into, for `model.heads`."""
  sums = {k: jnp.zeros((), jnp.float32) for k in (*SUMS[head_mode], "steps")}
  sums.update({f"loss_{k}": jnp.zeros((), jnp.float32) for k in HEADS})
  sums.update({f"first_nonfinite_{k}": jnp.full((), -1, jnp.int32) for k in HEADS})
  return sums
