"""Time of `musicgen prepare`: a cold run (every file parsed) then a rerun served by the cache.

  python scripts/bench_prepare.py [SOURCE ...] [--workers 2] [--filter TEXT]

SOURCE defaults to the MAESTRO root beside the checkout (../shared/maestro-v3.0.0); the corpus is
written to a temporary folder, removed afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicgen_jax import prepare  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "maestro-v3.0.0"


def timed_run(sources: list[str], out_dir: str, workers: int, filter_text: str | None) -> tuple[dict, float]:
  """The manifest of one preparation and the seconds it took."""
  start = time.perf_counter()
  manifest = prepare.prepare_corpus(sources, out_dir, workers=workers, filter_text=filter_text, progress=False)
  return manifest, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sources", nargs="*", default=[str(DEFAULT_SOURCE.resolve())], metavar="SOURCE")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--filter", dest="filter_text")
  args = parser.parse_args()
  print(f"{'run':<7} {'files':>6} {'events':>10} {'seconds':>8} {'files/s':>8}")
  with tempfile.TemporaryDirectory(prefix="bench-prepare-") as out_dir:
    for run in ("cold", "cached"):
      manifest, seconds = timed_run(args.sources, out_dir, args.workers, args.filter_text)
      files = sum(split["files"] for split in manifest["splits"].values())
      events = sum(split["events"] for split in manifest["splits"].values())
      print(f"{run:<7} {files:>6} {events:>10} {seconds:>8.1f} {files / seconds:>8.1f}", flush=True)


if __name__ == "__main__":
  main()
