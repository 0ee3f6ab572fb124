"""Where a sampling step's time goes: a `jax.profiler` trace of the compiled sampler, summed per XLA op.

Compiles `sampling.sample_compiled` as `scripts/bench_generate.py` does (random parameters, --batch
sequences of --length events from the start event), traces --calls calls and prints the ops that took
the most time per sampling step (one event of every sequence), with the shape each produces and the JAX
operation it came from. `taskset -c 0 python scripts/profile_generate.py` gives times that add up to the
step (one core: every op runs alone); compare `model.heads=regression` by running it once each.

  python scripts/profile_generate.py [--config default] [--batch 64] [--length 64] [--calls 5] [--top 30]
                                     [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
from profile_train import describe, op_times

from musicgen_jax import sampling, steps
from musicgen_jax.config import apply_overrides, load_config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default")
  parser.add_argument("--batch", type=int, default=64, help="sequences sampled at once")
  parser.add_argument("--length", type=int, default=64, help="events per sampling call")
  parser.add_argument("--calls", type=int, default=5, help="traced calls (after two untraced warm-ups)")
  parser.add_argument("--top", type=int, default=30, help="ops to print")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config = apply_overrides(load_config(args.config), ["sample.release_threshold=32.0", *args.overrides])
  graphdef, state = steps.create_train_state(config)
  call_args = (graphdef, state.params, *sampling.prime_compiled(graphdef, state.params, None),
               sampling.sequence_keys(config.seed, 0, args.batch), sampling.make_settings(config), args.length)

  def run() -> None:
    jax.block_until_ready(sampling.sample_compiled(*call_args)[0])

  run()
  run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.calls):
        run()
    nanoseconds, calls = op_times(Path(trace_dir), args.calls * args.length)
  hlo = sampling.sample_compiled.lower(*call_args).compile().as_text()
  print(f"{config.model.layers} x {config.model.hidden} LSTM ({args.config}, {config.model.heads} heads), "
        f"B = {args.batch}")
  print(f"{'us/step':>9} {'calls':>6}  {'op':34} {'result':30} from")
  for name, ns in nanoseconds.most_common(args.top):
    shape, origin = describe(hlo, name)
    print(f"{ns / 1e3:9.1f} {calls[name]:6.1f}  {name[:34]:34} {shape[:30]:30} {origin[-60:]}")
  print(f"all traced ops: {sum(nanoseconds.values()) / 1e6:.3f} ms per step (summed over threads)")


if __name__ == "__main__":
  main()
