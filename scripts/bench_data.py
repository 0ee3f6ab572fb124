"""Throughput of the training input pipeline: windows/s and events/s per worker count.

  python scripts/bench_data.py [STORE_DIR] [--workers 0,2] [--batches 500]

STORE_DIR is a folder written by `musicgen prepare`; without it a synthetic store of MAESTRO
size (~7M events over ~1100 pieces) is built in a temporary folder first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicgen_jax import config as config_lib  # noqa: E402
from musicgen_jax import input_pipeline, store  # noqa: E402

SYNTHETIC_PIECES = 1100
SYNTHETIC_EVENTS = 7_000_000
WARMUP_BATCHES = 5


def synthetic_pieces(seed: int = 0) -> list[store.Events]:
  """Random pieces with MAESTRO's piece count and total length, lengths spread log-normally."""
  rng = np.random.default_rng(seed)
  lengths = rng.lognormal(0.0, 0.6, SYNTHETIC_PIECES)
  lengths = np.maximum((lengths / lengths.sum() * SYNTHETIC_EVENTS).astype(np.int64), 1)
  total = int(lengths.sum())
  events = store.Events(rng.integers(21, 109, total, dtype=np.uint8),
                        rng.exponential(0.08, total).astype(np.float32),
                        np.where(rng.random(total) < 0.5, 0, rng.integers(1, 128, total)).astype(np.uint8))
  bounds = np.cumsum(lengths)[:-1]
  return [store.Events(*parts) for parts in zip(*(np.split(getattr(events, f), bounds) for f in store.FIELDS))]


def measure(config, data_dir: str, batches: int) -> tuple[float, float]:
  """Seconds to the first batch, then batches per second over `batches` after a short warm-up."""
  start = time.perf_counter()
  iterator = input_pipeline.train_iterator(config, data_dir)
  try:
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(WARMUP_BATCHES):
      next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    return first, batches / (time.perf_counter() - start)
  finally:
    iterator.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("store", nargs="?", help="a prepared store folder (default: synthetic, MAESTRO size)")
  parser.add_argument("--config", default="default", help="config name or file (default: default)")
  parser.add_argument("--workers", default="0,2", help="comma-separated worker counts to try")
  parser.add_argument("--batches", type=int, default=500, help="timed batches per worker count")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--window", type=int, default=256)
  args = parser.parse_args()

  config = config_lib.load_config(args.config)
  config.train.batch_size = args.batch_size
  config.data.window = args.window
  with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
    data_dir = args.store
    if data_dir is None:
      data_dir = scratch
      start = time.perf_counter()
      store.write_corpus(data_dir, {input_pipeline.TRAIN_SPLIT: synthetic_pieces(config.seed)})
      print(f"store: synthetic, built in {time.perf_counter() - start:.1f}s at {data_dir}")
    else:
      print(f"store: {data_dir}")
    train = store.open_split(data_dir, input_pipeline.TRAIN_SPLIT)
    print(f"train split: {train.num_pieces} pieces, {len(train.events):,} events; batch "
          f"{args.batch_size} x window {args.window}, prefetch {config.data.prefetch}, "
          f"augmentation on ({input_pipeline.Augmentation.from_config(config.data)})")
    for workers in (int(w) for w in args.workers.split(",")):
      config.data.workers = workers
      first, batches_per_s = measure(config, data_dir, args.batches)
      windows = batches_per_s * args.batch_size
      print(f"workers {workers}: {windows:,.0f} windows/s, {windows * args.window:,.0f} events/s "
            f"({batches_per_s:,.0f} batches/s; first batch after {first:.2f}s)")


if __name__ == "__main__":
  main()
