"""Where the train step's time goes: a `jax.profiler` trace of a few compiled steps, summed per XLA op.

Compiles the real `Trainer.train_steps` as `scripts/bench_train.py` does, traces --steps calls into
--trace-dir (open it with TensorBoard's profile plugin, xprof or Perfetto for the timeline) and
prints the ops that took the most time per step, with the shape each produces and the JAX operation
it came from. This is how the heads' transposed gradient copies and bfloat16's per-step restacking
were found.

  python scripts/profile_train.py [--config default] [--steps 2] [--top 30] [--trace-dir DIR] [key=value ...]

On several cores XLA runs independent ops at once and a matmul's helpers are not traced (a plain XLA
dot, such as the LSTM's weight gradients, shows only its launch while the thread pool computes it), so
the per-op times do not add up to the step; `taskset -c 0 python scripts/profile_train.py` gives times
that do (one core: every op runs alone).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

import jax

from bench_train import JaxStep
from musicgen_jax.config import apply_overrides, load_config

SKIPPED = ("Thunk", "Await", "wait for completion")  # Scheduling events that contain the ops' own.
CONTAINERS = ("while", "conditional", "call")  # Ops whose events contain their bodies' ops.


def op_times(trace_dir: Path, steps: int) -> tuple[collections.Counter, collections.Counter]:
  """Nanoseconds and calls per step of each traced op name, from the trace's XSpace file."""
  path = next(trace_dir.rglob("*.xplane.pb"))
  profile = jax.profiler.ProfileData.from_file(str(path))
  nanoseconds, calls = collections.Counter(), collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if not any(word in event.name for word in SKIPPED) and not event.name.startswith(CONTAINERS):
          nanoseconds[event.name] += event.duration_ns / steps
          calls[event.name] += 1 / steps
  return nanoseconds, calls


def describe(hlo: str, name: str) -> tuple[str, str]:
  """The result shape and the JAX operation (metadata op_name) of op `name` in the compiled HLO text."""
  line = re.search(r"%" + re.escape(name) + r" = (\S+) [^\n]*", hlo)
  if line is None:
    return "", ""
  origin = re.search(r"op_name=\"([^\"]*)\"", line.group(0))
  return line.group(1), origin.group(1) if origin else ""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default")
  parser.add_argument("--steps", type=int, default=2,
                      help="traced calls (after one untraced warm-up), each of steps.execution_steps steps")
  parser.add_argument("--top", type=int, default=30, help="ops to print")
  parser.add_argument("--trace-dir", type=Path, default=None,
                      help="where to keep the trace (default: a temporary folder)")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config = apply_overrides(load_config(args.config), args.overrides)
  step = JaxStep(config)
  with tempfile.TemporaryDirectory() as scratch:
    trace_dir = args.trace_dir or Path(scratch)
    with jax.profiler.trace(str(trace_dir)):
      for _ in range(args.steps):
        step()
    nanoseconds, calls = op_times(trace_dir, args.steps * step.steps_per_call)
  hlo = step.compiled.as_text()
  print(f"{'ms/step':>9} {'calls':>6}  {'op':34} {'result':30} from")
  for name, ns in nanoseconds.most_common(args.top):
    shape, origin = describe(hlo, name)
    print(f"{ns / 1e6:9.1f} {calls[name]:6.0f}  {name[:34]:34} {shape[:30]:30} {origin[-60:]}")
  print(f"all traced ops: {sum(nanoseconds.values()) / 1e6:.0f} ms per step (summed over threads)")
  if args.trace_dir:
    print(f"trace kept in {args.trace_dir}")


if __name__ == "__main__":
  main()
