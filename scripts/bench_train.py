"""Training throughput of the jitted train step: events/s after compile, and the compile time.

Runs the real `Trainer.train_step` (three optimizers, donated state) on batches shaped like the
config's, so that the step alone is measured; `scripts/bench_data.py` measures the input pipeline.

  python scripts/bench_train.py [--config default] [--steps 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from musicgen_jax import train
from musicgen_jax.config import apply_overrides, load_config


def synthetic_batch(batch_size: int, window: int, seed: int = 0) -> dict:
  """A batch with the pipeline's layout and dtypes, drawn at random."""
  rng = np.random.default_rng(seed)

  def events() -> dict:
    return {"pitch": rng.integers(0, 128, (batch_size, window)).astype(np.int32),
            "dt": rng.exponential(0.1, (batch_size, window)).astype(np.float32),
            "velocity": rng.integers(0, 128, (batch_size, window)).astype(np.float32)}

  return {"inputs": events(), "targets": events()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default")
  parser.add_argument("--steps", type=int, default=20, help="timed steps after compile")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config = apply_overrides(load_config(args.config), args.overrides)
  trainer = train.Trainer(config)
  batch = jax.device_put(synthetic_batch(config.train.batch_size, config.data.window))
  state, metrics = trainer.initial_state, train.zero_metrics()

  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, metrics, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, metrics, batch)
  jax.block_until_ready(state)

  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, metrics, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / args.steps
  events = config.train.batch_size * config.data.window
  result = {
      "config": args.config, "overrides": args.overrides, "batch_size": config.train.batch_size,
      "window": config.data.window, "hidden": config.model.hidden, "layers": config.model.layers,
      "dtype": config.model.dtype, "compile_s": round(compile_s, 2), "step_ms": round(1000 * step_s, 1),
      "events_per_s": round(events / step_s), "backend": jax.default_backend(), "devices": jax.device_count(),
      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
      "load_avg_1m": round(os.getloadavg()[0], 2),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
