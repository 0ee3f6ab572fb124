"""Generation throughput: events/s of the jitted sampling scan against the original's loop and PyTorch.

After compile, at each batch size B, three loops sample from the same model shapes (the config's):
  * jax scan: `sampling.sample_compiled`, one `lax.scan` carrying every layer's (h, c), B sequences,
    with the config's heads (`model.heads`), and, where those are distribution heads, the same scan
    with regression heads (the price of drawing every sub-event, measured in the same rounds);
  * original: the original's loop in JAX, batch 1: the whole last window (data.window events) re-run
    from the zero state to produce each 4 new events, the predictions at its last 4 positions, with
    the original's regression heads;
  * torch: a stateful PyTorch loop (nn.LSTM + the original's regression heads, (h, c) carried,
    inference mode) at B, when torch is importable.
Parameters are random (speed does not depend on them). Each loop runs for about --seconds, in
--rounds interleaved rounds whose best rate is kept.

  python scripts/bench_generate.py [--config default] [--batch-sizes 1 64 256] [--seconds 3] [--rounds 3]
                                   [--no-torch] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicgen_jax import models, sampling, steps
from musicgen_jax.config import apply_overrides, load_config

ORIGINAL_EVENTS_PER_CALL = 4


def events_per_second(call: Callable[[], object], events_per_call: int, seconds: float) -> float:
  """Events/s of `call` (which blocks until its events are ready) over about `seconds`."""
  calls, start = 0, time.perf_counter()
  while calls == 0 or time.perf_counter() - start < seconds:
    call()
    calls += 1
  return calls * events_per_call / (time.perf_counter() - start)


def best_rates(loops: dict[str, tuple[Callable[[], object], int]], seconds: float, rounds: int) -> dict[str, float]:
  """The best events/s of each loop over `rounds` interleaved rounds of `seconds` / `rounds` each, after a warm-up.

  Interleaving and keeping the best make the ratios robust to other work on the machine.
  """
  for call, _ in loops.values():
    call()
  best = dict.fromkeys(loops, 0.0)
  for _ in range(rounds):
    for name, (call, events) in loops.items():
      best[name] = max(best[name], events_per_second(call, events, seconds / rounds))
  return best


def jax_scan(graphdef: nnx.GraphDef, params: nnx.State, settings: sampling.Settings, batch: int,
             length: int) -> Callable[[], object]:
  """One compiled sampling call of `length` events for `batch` sequences from the start event."""
  state, event = sampling.prime_compiled(graphdef, params, None)
  keys = sampling.sequence_keys(0, 0, batch)
  return lambda: jax.block_until_ready(sampling.sample_compiled(graphdef, params, state, event, keys, settings,
                                                                length)[0])


def original_loop(graphdef: nnx.GraphDef, params: nnx.State, settings: sampling.Settings,
                  window: int) -> Callable[[], object]:
  """One step of the original's loop: the window re-run from the zero state, 4 events drawn and appended."""

  @jax.jit
  def step(window_events: sampling.Event, key: jax.Array) -> tuple[sampling.Event, jax.Array]:
    outputs, _ = nnx.merge(graphdef, params)(window_events)
    last = jax.tree.map(lambda x: x[0, -ORIGINAL_EVENTS_PER_CALL:], outputs)
    key, draw = jax.random.split(key)
    new = sampling.next_event(last, jax.random.split(draw, ORIGINAL_EVENTS_PER_CALL), settings)
    shifted = jax.tree.map(lambda w, n: jnp.concatenate([w[:, ORIGINAL_EVENTS_PER_CALL:], n[None]], 1),
                           window_events, new)
    return shifted, key

  rng = np.random.default_rng(0)
  carry = [({"pitch": jnp.asarray(rng.integers(0, 128, (1, window)), jnp.int32),
             "dt": jnp.asarray(rng.exponential(0.1, (1, window)), jnp.float32),
             "velocity": jnp.asarray(rng.integers(0, 128, (1, window)), jnp.float32)}, jax.random.key(0))]

  def call() -> object:
    carry[0] = jax.block_until_ready(step(*carry[0]))
    return carry[0]

  return call


def torch_loop(model_config: ml_collections.ConfigDict, sample_config: ml_collections.ConfigDict, batch: int,
               length: int) -> Callable[[], object]:
  """A PyTorch stateful loop of `length` events for `batch` sequences: nn.LSTM and the original's heads."""
  import torch
  from torch import nn

  hidden, embed = model_config.hidden, model_config.embed
  widths = [hidden // d for d in model_config.head_divisors]

  def head(out_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, widths[0]), nn.ReLU(), nn.Linear(widths[0], widths[1]), nn.ReLU(),
                         nn.Linear(widths[1], out_features))

  torch.manual_seed(0)
  net = nn.ModuleDict({"embed": nn.Embedding(models.NUM_PITCHES, embed),
                       "lstm": nn.LSTM(embed + 2, hidden, model_config.layers, batch_first=True),
                       "pitch": head(models.NUM_PITCHES), "time": head(1), "velocity": head(1)}).eval()

  def call() -> object:
    with torch.inference_mode():
      pitch = torch.full((batch,), sampling.START_EVENT["pitch"], dtype=torch.long)
      dt, velocity, carried = torch.zeros(batch), torch.zeros(batch), None
      sounding, rows = torch.zeros((batch, models.NUM_PITCHES), dtype=torch.bool), torch.arange(batch)
      out = torch.empty((3, batch, length))
      for t in range(length):
        x = torch.cat([net["embed"](pitch), torch.log1p(dt / models.DT_INPUT_SCALE)[:, None],
                       (velocity / models.MAX_VELOCITY)[:, None]], -1)
        features, carried = net["lstm"](x[:, None], carried)
        features = features[:, 0]
        predicted = net["velocity"](features)[:, 0] * models.MAX_VELOCITY
        release = (predicted < sample_config.release_threshold) & sounding.any(-1)
        allowed = torch.where(release[:, None], sounding, ~sounding)
        allowed |= ~allowed.any(-1, keepdim=True)
        logits = net["pitch"](features).masked_fill(~allowed, float("-inf"))
        pitch = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
        dt = net["time"](features)[:, 0].clamp(0.0, sample_config.max_dt)
        velocity = torch.where(release, 0.0, predicted.round().clamp(sample_config.release_threshold,
                                                                     models.MAX_VELOCITY))
        sounding[rows, pitch] = ~release
        out[0, :, t], out[1, :, t], out[2, :, t] = pitch, dt, velocity
      return out

  return call


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
  parser.add_argument("--length", type=int, default=64, help="events per sampling call (scan and torch)")
  parser.add_argument("--seconds", type=float, default=3.0, help="time spent measuring each loop")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config = apply_overrides(load_config(args.config), ["sample.release_threshold=32.0", *args.overrides])
  graphdef, state = steps.create_train_state(config)
  settings = sampling.make_settings(config)
  regression = apply_overrides(config, ["model.heads=regression"])
  regression_graphdef, regression_state = steps.create_train_state(regression)
  # The original's model reads the events alone.
  original_graphdef, original_state = steps.create_train_state(apply_overrides(regression, ["model.condition=none"]))
  has_torch = not args.no_torch and torch_available()
  load_before = os.getloadavg()[0]

  original = best_rates({"original": (original_loop(original_graphdef, original_state.params, settings,
                                                    config.data.window),
                                      ORIGINAL_EVENTS_PER_CALL)}, args.seconds, args.rounds)["original"]
  rows = []
  for batch in args.batch_sizes:
    start = time.perf_counter()
    scan_call = jax_scan(graphdef, state.params, settings, batch, args.length)
    scan_call()
    first_call_s = time.perf_counter() - start
    loops = {"jax_scan": (scan_call, batch * args.length)}
    if config.model.heads != "regression":
      loops["jax_scan_regression"] = (jax_scan(regression_graphdef, regression_state.params, settings, batch,
                                               args.length), batch * args.length)
    if has_torch:
      loops["torch"] = (torch_loop(config.model, config.sample, batch, args.length), batch * args.length)
    rows.append({"batch": batch, "torch": None, "jax_scan_regression": None,
                 **best_rates(loops, args.seconds, args.rounds), "first_call_s": first_call_s})

  print(f"{config.model.layers} x {config.model.hidden} LSTM ({args.config}, {config.model.heads} heads), "
        f"{args.length} events per call, "
        f"original: batch 1, window {config.data.window}, {ORIGINAL_EVENTS_PER_CALL} events per call")
  print(f"{'B':>5} {'jax scan ev/s':>14} {'regression':>11} {'torch ev/s':>11} {'jax/original':>13} {'jax/torch':>10}")
  for row in rows:
    number = lambda value: f"{value:>11.0f}" if value else f"{'-':>11}"
    ratio_text = f"{row['jax_scan'] / row['torch']:>9.2f}x" if row["torch"] else f"{'-':>10}"
    print(f"{row['batch']:>5} {row['jax_scan']:>14.0f} {number(row['jax_scan_regression'])} {number(row['torch'])} "
          f"{row['jax_scan'] / original:>12.1f}x {ratio_text}")
  print(f"original loop (B=1): {original:.0f} ev/s")
  print(json.dumps({
      "config": args.config, "overrides": args.overrides, "heads": config.model.heads, "hidden": config.model.hidden,
      "layers": config.model.layers, "length": args.length, "original_events_per_s": round(original),
      "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
      "backend": jax.default_backend(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
      "torch": has_torch, "load_avg_1m_before": round(load_before, 2),
      "load_avg_1m_after": round(os.getloadavg()[0], 2),
  }))


if __name__ == "__main__":
  main()
