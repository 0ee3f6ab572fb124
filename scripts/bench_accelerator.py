"""Accelerator throughput of every LSTM recurrence: training and generation events/s, compile times, and
PyTorch's cuDNN LSTM in the same run.

For each recurrence (`--recurrences`, default cudnn, scan and fused; `auto` is reported as the one it
picks) and each compute dtype it allows (cudnn: float32 only), it compiles and times the training step
at each of `--batch-sizes` x `--window` events (64, 256 and 1024 x 256), then generation
(`sampling.sample_compiled`, float32) of `--generate-length` events at each of `--generate-batch-sizes`
(256 and 4,096). Where PyTorch with CUDA is importable it times `torch_reference.TorchStep` (nn.LSTM on
cuDNN, the same heads and losses, three Adams) at the training shapes, float32 and bfloat16 autocast;
elsewhere the JSON says why it did not.

Training runs the real `steps.Trainer.train_steps` (`bench_train.JaxStep`: the three optimizers,
`train.steps_per_execution` steps per compiled call) on one device and synthetic batches, so the script
needs only jax, flax, optax, numpy and ml-collections (no grain, note-seq, orbax or tensorboardX). The
heads default to the original's regression heads, those of the PyTorch reference (with
`model.heads=distribution` ours run alone). A case that fails (out of memory,
say) is recorded with its error and the others still run. Cases run float32 training first, then
generation, then bfloat16 training; none starts after `--budget-s` (default 270 s, so that the run ends
within 5 minutes), and the JSON file, rewritten after every case, lists those left out. A table is
printed at the end.

  python scripts/bench_accelerator.py [--out bench_accelerator.json] [--smoke] [--config default]
      [--recurrences cudnn scan fused] [--dtypes float32 bfloat16] [--batch-sizes 64 256 1024]
      [--window 256] [--generate-batch-sizes 256 4096] [--generate-length 256] [--calls 3]
      [--budget-s 270] [key=value ...]

`--smoke` shrinks every size (a 2 x 16 LSTM, batch 2 x window 8) to check the script on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx
from torch_reference import TorchStep

from bench_train import JaxStep
from musicgen_jax import losses, models, sampling
from musicgen_jax.config import apply_overrides, load_config
from musicgen_jax.errors import UserError

SMOKE = {"batch_sizes": [2], "window": 8, "generate_batch_sizes": [2], "generate_length": 4, "calls": 1,
         "overrides": ["model.hidden=16", "model.embed=8", "train.steps_per_execution=2"]}


def seconds_per_call(call: Callable[[], Any], calls: int) -> float:
  """Seconds per call of `call` (which blocks until its result is ready), averaged over `calls` calls."""
  start = time.perf_counter()
  for _ in range(calls):
    call()
  return (time.perf_counter() - start) / calls


def train_case(config: ml_collections.ConfigDict, calls: int) -> dict[str, Any]:
  """Compile time and events/s of the real `Trainer.train_steps` (`bench_train.JaxStep`) at the config's shapes."""
  jax_step = JaxStep(config)
  seconds = seconds_per_call(jax_step, calls) / jax_step.steps_per_call
  metrics = jax.device_get(jax_step.metrics)
  return {"events_per_s": config.train.batch_size * config.data.window / seconds, "step_ms": 1000 * seconds,
          "compile_s": jax_step.compile_s, "steps_per_call": jax_step.steps_per_call,
          "mean_loss": sum(float(metrics[f"loss_{head}"]) for head in losses.HEADS) / float(metrics["steps"])}


def generate_case(config: ml_collections.ConfigDict, batch: int, length: int, calls: int) -> dict[str, Any]:
  """Compile time and events/s of `sampling.sample_compiled`: `length` events for `batch` sequences per call."""
  graphdef, params = nnx.split(models.MusicLSTM(config.model, rngs=nnx.Rngs(params=config.seed)), nnx.Param)
  settings = sampling.make_settings(config)
  state, event = sampling.prime_compiled(graphdef, params, None)
  keys = sampling.sequence_keys(0, 0, batch)
  start = time.perf_counter()
  compiled = sampling.sample_compiled.lower(graphdef, params, state, event, keys, settings, length).compile()
  compile_s = time.perf_counter() - start
  call = lambda: jax.block_until_ready(compiled(params, state, event, keys, settings))
  call()
  seconds = seconds_per_call(call, calls)
  return {"events_per_s": batch * length / seconds, "compile_s": compile_s}


def torch_case(config: ml_collections.ConfigDict, torch: Any, calls: int) -> dict[str, Any]:
  """Events/s of the PyTorch reference on CUDA at the config's shapes, as many steps as ours per case."""
  steps = config.train.steps_per_execution * calls
  seconds = seconds_per_call(TorchStep(config, torch, "cuda"), steps)
  return {"events_per_s": config.train.batch_size * config.data.window / seconds, "step_ms": 1000 * seconds}


def cuda_torch(config: ml_collections.ConfigDict) -> tuple[Any, str | None]:
  """PyTorch where it can run the reference on CUDA, else None and the reason."""
  if config.model.heads != "regression":
    return None, "the PyTorch reference has the original's regression heads: run with model.heads=regression"
  try:
    import torch
  except ImportError:
    return None, "PyTorch is not importable"
  if not torch.cuda.is_available():
    return None, (f"torch {torch.__version__} sees no CUDA device; the CPU reference is scripts/bench_train.py")
  return torch, None


def versions(torch: Any) -> dict[str, Any]:
  """The versions and precision settings that the figures depend on."""
  found = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}
  found["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
  if torch is not None:
    found.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                 torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
  return found


def unavailable(recurrence: str, dtype: str) -> str | None:
  """Why this backend cannot run `recurrence` in `dtype` (cudnn off CUDA/ROCm or in bfloat16), else None."""
  try:
    models.resolve_recurrence(recurrence, dtype)
  except UserError as error:
    return str(error)
  return None


def run_case(result: dict[str, Any], name: str, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> None:
  """Appends `key` with `measure()`'s figures, or with the error that stopped it, to `result[name]`."""
  start = time.perf_counter()
  try:
    result[name].append({**key, **measure()})
  except Exception as error:  # One failing case (out of memory, say) must not lose the others.
    result[name].append({**key, "error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"})
  figures = result[name][-1]
  outcome = f"{figures['events_per_s']:,.0f} events/s" if "events_per_s" in figures else figures["error"]
  print(f"  {name} {json.dumps(key)}: {outcome} ({time.perf_counter() - start:.1f} s)", flush=True)


def cell(rows: list[dict], **key: Any) -> str:
  """One table cell: events/s (compile seconds) of the row matching `key`, `error`, or `-` if none."""
  row = next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)
  if row is None:
    return "-"
  if "error" in row:
    return "error"
  compile_s = f" ({row['compile_s']:.0f} s)" if "compile_s" in row else ""
  return f"{row['events_per_s']:,.0f}{compile_s}"


def print_table(result: dict[str, Any]) -> None:
  """The figures as two tables: training by recurrence and dtype, generation by recurrence."""
  batches, generate_batches = result["batch_sizes"], result["generate_batch_sizes"]
  print(f"\ntraining events/s (compile s), window {result['window']}, {result['device']}")
  print(f"{'':20}" + "".join(f"{'B=' + str(b):>22}" for b in batches))
  for recurrence, dtype in dict.fromkeys((r["recurrence"], r["dtype"]) for r in result["train"]):
    cells = (cell(result["train"], recurrence=recurrence, dtype=dtype, batch=b) for b in batches)
    print(f"{recurrence + ' ' + dtype:20}" + "".join(f"{c:>22}" for c in cells))
  for dtype in dict.fromkeys(r["dtype"] for r in result["torch_train"]):
    cells = (cell(result["torch_train"], dtype=dtype, batch=b) for b in batches)
    print(f"{'torch ' + dtype:20}" + "".join(f"{c:>22}" for c in cells))
  for row in result["skipped"]:
    print("skipped " + " ".join(str(v) for k, v in row.items() if k != "reason") + f": {row['reason']}")
  if result["torch_skipped"]:
    print(f"PyTorch reference skipped: {result['torch_skipped']}")
  print(f"\ngeneration events/s (compile s), {result['generate_length']} events per call, float32")
  print(f"{'':20}" + "".join(f"{'B=' + str(b):>22}" for b in generate_batches))
  for recurrence in dict.fromkeys(r["recurrence"] for r in result["generate"]):
    cells = (cell(result["generate"], recurrence=recurrence, batch=b) for b in generate_batches)
    print(f"{recurrence:20}" + "".join(f"{c:>22}" for c in cells))
  print(f"auto picks {result['auto']}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="bench_accelerator.json", help="the JSON file written")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
  parser.add_argument("--config", default="default")
  parser.add_argument("--recurrences", nargs="+", default=["cudnn", "scan", "fused"],
                      choices=[r for r in models.RECURRENCES if r != "auto"])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
  parser.add_argument("--window", type=int, default=256)
  parser.add_argument("--generate-batch-sizes", type=int, nargs="+", default=[256, 4096])
  parser.add_argument("--generate-length", type=int, default=256)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per case, after one untimed")
  parser.add_argument("--budget-s", type=float, default=270.0, help="no case starts after this many seconds")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  if args.smoke:
    for name, value in SMOKE.items():
      setattr(args, name, value if name != "overrides" else [*value, *args.overrides])
  base = apply_overrides(load_config(args.config), ["model.heads=regression", "sample.release_threshold=32.0",
                                                    "mesh.data=1", *args.overrides])
  torch, torch_skipped = cuda_torch(base)
  device = jax.devices()[0]
  result = {
      "config": args.config, "overrides": args.overrides, "backend": jax.default_backend(),
      "device": device.device_kind, "devices": jax.device_count(), "host": platform.node(),
      "model": base.model.to_dict(), "window": args.window, "batch_sizes": args.batch_sizes,
      "generate_batch_sizes": args.generate_batch_sizes, "generate_length": args.generate_length,
      "calls": args.calls, "versions": versions(torch),
      "auto": {dtype: models.resolve_recurrence("auto", dtype) for dtype in args.dtypes},
      "train": [], "skipped": [], "generate": [], "torch_train": [], "torch_skipped": torch_skipped,
  }
  out = Path(args.out)
  save = lambda: out.write_text(json.dumps(result, indent=1) + "\n")
  started = time.perf_counter()
  print(f"{result['device']} ({result['backend']}): writing {out}", flush=True)

  def config_of(*overrides: str) -> ml_collections.ConfigDict:
    return apply_overrides(base, [f"data.window={args.window}", *overrides])

  def training(dtype: str) -> list[tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]]:
    cases = []
    for recurrence in args.recurrences:
      reason = unavailable(recurrence, dtype)
      if reason:
        result["skipped"].append({"case": "train", "recurrence": recurrence, "dtype": dtype, "reason": reason})
        continue
      cases += [("train", {"recurrence": recurrence, "dtype": dtype, "batch": batch},
                 functools.partial(train_case, config_of(f"model.recurrence={recurrence}", f"model.dtype={dtype}",
                                                         f"train.batch_size={batch}"), args.calls))
                for batch in args.batch_sizes]
    if torch is not None:
      cases += [("torch_train", {"dtype": dtype, "batch": batch},
                 functools.partial(torch_case, config_of(f"model.dtype={dtype}", f"train.batch_size={batch}"), torch,
                                   args.calls))
                for batch in args.batch_sizes]
    return cases

  generation = []
  for recurrence in args.recurrences:
    reason = unavailable(recurrence, "float32")
    if reason:
      result["skipped"].append({"case": "generate", "recurrence": recurrence, "dtype": "float32", "reason": reason})
      continue
    generation += [("generate", {"recurrence": recurrence, "batch": batch},
                    functools.partial(generate_case, config_of(f"model.recurrence={recurrence}"), batch,
                                      args.generate_length, args.calls))
                   for batch in args.generate_batch_sizes]
  # The most wanted first, so that a run cut short by --budget-s misses the least: float32 training, generation,
  # then the other dtype.
  first, *others = sorted(args.dtypes, key=lambda dtype: dtype != "float32")
  for name, key, measure in training(first) + generation + [c for dtype in others for c in training(dtype)]:
    if time.perf_counter() - started > args.budget_s:
      result["skipped"].append({"case": name, **key, "reason": f"not started: past --budget-s {args.budget_s:g}"})
    else:
      run_case(result, name, key, measure)
    save()
  result["total_s"] = round(time.perf_counter() - started, 1)
  save()
  print_table(result)
  print(f"\n{result['total_s']} s in all; figures in {out}")


if __name__ == "__main__":
  main()
