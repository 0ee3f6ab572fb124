"""Peak memory of a `musicgen train` run: the summed RSS and PSS of the process and its workers.

PSS counts pages shared between processes (the memory-mapped event store, libraries) once, split
among them, so it is the honest total; RSS counts shared pages in every process.

  python scripts/bench_memory.py --data DIR [--config default] [--steps 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import psutil


def tree_memory(root: psutil.Process) -> tuple[int, int]:
  """Summed (rss, pss) in bytes of `root` and all its descendants that are still alive."""
  rss = pss = 0
  for process in [root, *root.children(recursive=True)]:
    try:
      info = process.memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      continue
    rss += info.rss
    pss += getattr(info, "pss", info.rss)
  return rss, pss


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True)
  parser.add_argument("--config", default="default")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, "-m", "musicgen_jax.cli", "train", "--workdir", workdir, "--config", args.config,
               "--data", args.data, "--quiet", f"train.steps={args.steps}", *args.overrides]
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    peak_rss = peak_pss = 0
    start = time.perf_counter()
    while process.poll() is None:
      rss, pss = tree_memory(root)
      peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
      time.sleep(0.1)
  print(json.dumps({"command": " ".join(command[1:]), "exit": process.returncode,
                    "seconds": round(time.perf_counter() - start, 1),
                    "peak_rss_gb": round(peak_rss / 2**30, 2), "peak_pss_gb": round(peak_pss / 2**30, 2)}))


if __name__ == "__main__":
  main()
