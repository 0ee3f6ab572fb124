"""Reliability figures (issue 6): odd files through `prepare`, a fuzzed reader, `prepare` and `train` SIGKILLed.

  python scripts/reliability_report.py [--fuzz 2000] [--prepare-rounds 3] [--train-kills 10] [--seed 0]

Runs the harness of tests/test_reliability.py at a larger scale in a temporary folder and prints the
figures; it raises, as the tests fail, if anything is lost or wrong. Takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from musicgen_jax import prepare  # noqa: E402
from tests import test_reliability as harness  # noqa: E402


def corpus_figures(tmp: Path) -> dict:
  """The odd-file corpus through `prepare`: files tried, how many gave events, the others by reason."""
  expected = harness.write_corpus(tmp / "corpus")
  manifest = prepare.prepare_corpus([str(tmp / "corpus")], tmp / "out", workers=2, val_fraction=0.0, progress=False)
  outcomes = harness.outcomes_by_name(manifest, tmp / "out")
  assert outcomes == expected
  reasons = collections.Counter(o for o in outcomes.values() if isinstance(o, str))
  return {"files": len(outcomes), "gave_events": len(outcomes) - sum(reasons.values()), "skipped": dict(reasons)}


def time_limit_figures(tmp: Path) -> dict:
  """A file that takes some 10 s to read between two quick ones, with a 0.5 s limit: outcomes and wall time."""
  (tmp / "corpus").mkdir()
  files = {"a.mid": harness.TUNE, "slow.mid": harness.many_notes(1_000_000), "z.mid": harness.TUNE}
  for name, content in files.items():
    (tmp / "corpus" / name).write_bytes(content)
  start = time.monotonic()
  manifest = prepare.prepare_corpus([str(tmp / "corpus")], tmp / "out", val_fraction=0.0, progress=False,
                                    file_timeout=0.5)
  return {"outcomes": harness.outcomes_by_name(manifest, tmp / "out"), "seconds": round(time.monotonic() - start, 1)}


def fuzz_figures(tmp: Path, examples: int, seed: int) -> dict:
  """`examples` randomly mutated files through the reader: how many gave events, the others by reason."""
  rng = random.Random(seed)
  outcomes = collections.Counter()
  path = tmp / "fuzzed.mid"
  for _ in range(examples):
    mutations = [(rng.choice(["set", "insert", "delete"]), rng.randrange(10**6), rng.randrange(256))
                 for _ in range(rng.randrange(7))]
    path.write_bytes(harness.mutate(rng.choice(harness.SEEDS), mutations, rng.randrange(401)))
    outcome = harness.read_outcome(path)
    outcomes["gave events" if isinstance(outcome, int) else outcome] += 1
  return {"files": examples, "outcomes": dict(outcomes.most_common())}


def crash_figures(tmp: Path) -> dict:
  with pytest.MonkeyPatch.context() as monkeypatch:
    return harness.crash_before_each_rename(tmp, monkeypatch)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--fuzz", type=int, default=2000, help="mutated files to read")
  parser.add_argument("--prepare-rounds", type=int, default=3, help="fresh folders, each prepared with 2 kills")
  parser.add_argument("--train-kills", type=int, default=10, help="SIGKILLs of training")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  sections = {
      "odd files through prepare": corpus_figures,
      "--file-timeout 0.5": time_limit_figures,
      "fuzzed reader": lambda tmp: fuzz_figures(tmp, args.fuzz, args.seed),
      "prepare SIGKILLed (--workers 1)": lambda tmp: harness.kill_prepare(tmp, args.prepare_rounds, 2, args.seed),
      "prepare's parent killed before each rename": crash_figures,
      f"train SIGKILLed (tiny, {harness.TRAIN_STEPS} steps)": lambda tmp: harness.kill_training(
          tmp, harness.reference_run(tmp), args.train_kills, args.seed),
  }
  with tempfile.TemporaryDirectory(prefix="reliability-") as folder:
    for index, (title, figures) in enumerate(sections.items()):
      start = time.monotonic()
      (Path(folder) / str(index)).mkdir()
      result = figures(Path(folder) / str(index))
      print(f"{title} ({time.monotonic() - start:.0f} s):")
      for key, value in result.items():
        print(f"  {key.replace('_', ' ')}: {value}")


if __name__ == "__main__":
  main()
