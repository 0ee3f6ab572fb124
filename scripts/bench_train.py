"""Training throughput of the jitted train step against a GEMM roof and a PyTorch reference.

Runs the real `Trainer.train_steps` as the training loop does (three optimizers, donated state,
`steps.execution_steps` steps per call) on batches shaped like the config's, so that the steps alone
are measured; `scripts/bench_data.py` measures the input pipeline.
In the same process it measures the GEMM roof with jax (a 2048^3 matmul of the model's compute
dtype, accumulated in float32) and a plain PyTorch model of the same shapes (`torch_reference.py`:
nn.LSTM, the original's three heads, Adam, the same isolation; under bfloat16 autocast when
`model.dtype=bfloat16`), and
reports events/s, model FLOPs utilisation (one training event ~ 3x its forward matmul FLOPs) and
the ratio to PyTorch. Rounds alternate jax and PyTorch and the best of each is kept, so that a
burst of load from other processes hurts both alike; the load average is printed with the figures.

  python scripts/bench_train.py [--config default] [--steps 3] [--rounds 4] [--no-torch]
      [--versus key=value ...] [key=value ...]

`--versus` times a second configuration (the first with those overrides too) in the same alternating
rounds, e.g. `--versus model.heads=regression`: on a machine whose speed drifts by 10% within minutes,
two modes compare fairly only when measured together.

PyTorch comes from `pip install -e ".[bench]"` (a CPU wheel). XLA CPU flags can be tried without
code changes through the environment, e.g. XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (dots
without YNNPACK: slower on a 2-core Xeon); the library itself sets none. On a shared machine, run
with a low `uptime` load: the figures of both frameworks fall with it, PyTorch's most.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from torch_reference import TorchStep, synthetic_batch

from musicgen_jax import models, steps
from musicgen_jax.config import apply_overrides, load_config

GEMM_SIZE = 2048


def forward_flops_per_event(model: ml_collections.ConfigDict) -> int:
  """Matmul FLOPs of one event's forward pass: the LSTM layers' input and recurrent products and the heads."""
  in_features = model.embed + (2 if model.inputs == "pitch+dt+velocity" else 0)
  flops = 0
  for layer in range(model.layers):
    flops += 2 * ((in_features if layer == 0 else model.hidden) + model.hidden) * 4 * model.hidden
  widths = [model.hidden] + [model.hidden // d for d in model.head_divisors]
  trunk = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
  for out_features in (models.NUM_PITCHES, 1, 1):
    flops += trunk + 2 * widths[-1] * out_features
  return flops


def timed(run: Callable[[], Any], repeats: int) -> float:
  """Seconds per call of `run` (which blocks until its result is ready), averaged over `repeats`."""
  start = time.perf_counter()
  for _ in range(repeats):
    run()
  return (time.perf_counter() - start) / repeats


def gemm_roof(dtype: str, repeats: int = 10) -> float:
  """FLOP/s of a jitted 2048^3 matmul of `dtype` inputs accumulated in float32, its fastest call: the
  dense-compute ceiling of this process for the model's compute dtype."""
  a, b = (jax.random.normal(jax.random.key(i), (GEMM_SIZE, GEMM_SIZE), dtype) for i in range(2))
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  return 2 * GEMM_SIZE**3 / min(timed(lambda: matmul(a, b).block_until_ready(), 1) for _ in range(repeats))


class JaxStep:
  """Our compiled `Trainer.train_steps` as the training loop calls it (`steps.execution_steps` steps per
  call), stepping its own state on one fixed batch."""

  def __init__(self, config: ml_collections.ConfigDict):
    trainer = steps.Trainer(config)
    self.steps_per_call = trainer.steps_per_execution
    batch = synthetic_batch(config.train.batch_size, config.data.window)
    self.batches = trainer.shard_batches([batch] * self.steps_per_call)
    self.state, self.metrics = trainer.initial_state, trainer.zero_metrics()
    start = time.perf_counter()
    self.compiled = trainer.train_steps.lower(self.state, self.metrics, self.batches).compile()
    self.compile_s = time.perf_counter() - start
    self()

  def __call__(self) -> None:
    self.state, self.metrics = self.compiled(self.state, self.metrics, self.batches)
    jax.block_until_ready((self.state, self.metrics))


def import_torch() -> Any:
  """PyTorch with one thread per core, or None (with a hint) when it is not installed."""
  try:
    import torch
  except ImportError:
    print('PyTorch is not installed: pip install -e ".[bench]" to compare against it; skipping.')
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default")
  parser.add_argument("--steps", type=int, default=3,
                      help="timed calls per round and framework (a jax call runs steps.execution_steps steps)")
  parser.add_argument("--rounds", type=int, default=4, help="alternating jax/PyTorch rounds; the best is kept")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--versus", action="append", default=[], metavar="KEY=VALUE",
                      help="an override of a second jax configuration timed in the same rounds (repeatable)")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config = apply_overrides(load_config(args.config), args.overrides)
  torch = None if args.no_torch else import_torch()
  load_start = os.getloadavg()[0]

  jax_step = JaxStep(config)
  runners = {"jax": jax_step}
  if args.versus:
    runners["jax versus"] = JaxStep(apply_overrides(load_config(args.config), [*args.overrides, *args.versus]))
  if torch is not None:
    runners["torch"] = TorchStep(config, torch)
  step_s, roof = {name: float("inf") for name in runners}, 0.0
  for round_index in range(args.rounds):
    order = list(runners.items())[::-1 if round_index % 2 else 1]
    for name, step in order:
      step_s[name] = min(step_s[name], timed(step, args.steps) / step.steps_per_call)
    roof = max(roof, gemm_roof(config.model.dtype))

  events = config.train.batch_size * config.data.window
  train_flops = 3 * forward_flops_per_event(config.model)
  rates = {name: events / s for name, s in step_s.items()}
  result = {
      "config": args.config, "overrides": args.overrides, "batch_size": config.train.batch_size,
      "window": config.data.window, "hidden": config.model.hidden, "layers": config.model.layers,
      "dtype": config.model.dtype, "recurrence": models.resolve_recurrence(config.model.recurrence, config.model.dtype),
      "steps_per_execution": jax_step.steps_per_call,
      "compile_s": round(jax_step.compile_s, 2),
      "step_ms": round(1000 * step_s["jax"], 1), "events_per_s": round(rates["jax"]),
      "train_mflop_per_event": round(train_flops / 1e6, 2),
      "model_gflop_per_s": round(rates["jax"] * train_flops / 1e9, 1),
      "gemm_roof_gflop_per_s": round(roof / 1e9, 1), "mfu": round(rates["jax"] * train_flops / roof, 3),
      "versus": args.versus or None, "versus_events_per_s": round(rates["jax versus"]) if args.versus else None,
      "vs_versus": round(rates["jax"] / rates["jax versus"], 3) if args.versus else None,
      "torch_events_per_s": round(rates["torch"]) if torch is not None else None,
      "vs_torch": round(rates["jax"] / rates["torch"], 3) if torch is not None else None,
      "torch_version": torch.__version__ if torch is not None else None,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
      "load_avg_1m_start": round(load_start, 2), "load_avg_1m": round(os.getloadavg()[0], 2),
  }
  print(f"{'':22}{'events/s':>10}{'step ms':>10}{'GFLOP/s':>10}{'of roof':>9}")
  for name, rate in rates.items():
    gflops = rate * train_flops / 1e9
    print(f"{name + ' train step':22}{rate:10.0f}{1000 * step_s[name]:10.1f}{gflops:10.1f}{gflops * 1e9 / roof:9.1%}")
  print(f"{'jax 2048^3 GEMM roof':22}{'':20}{roof / 1e9:10.1f}   ({config.model.dtype} inputs)")
  if args.versus:
    print(f"jax / jax versus {' '.join(args.versus)}: {result['vs_versus']:.3f}x")
  if torch is not None:
    print(f"jax / PyTorch: {result['vs_torch']:.3f}x")
  print(f"recurrence {result['recurrence']}; compile {result['compile_s']} s; {train_flops / 1e6:.1f} MFLOP per "
        f"training event; load average {result['load_avg_1m_start']} -> {result['load_avg_1m']} "
        f"on {os.cpu_count()} cores")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
