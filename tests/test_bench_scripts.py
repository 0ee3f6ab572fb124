"""The throughput benchmarks run on a conditioned model, as `configs/default.py` is, and report real rates."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONDITIONED = ["--config", "tiny", "model.condition=density+polyphony"]


@pytest.mark.parametrize("script, arguments, rate", [
    ("bench_generate.py", ["--no-torch", "--batch-sizes", "2", "--length", "4", "--rounds", "1", "--seconds", "0.05"],
     lambda report: min(report["original_events_per_s"], report["rows"][0]["jax_scan"],
                        report["rows"][0]["jax_scan_regression"])),
    ("bench_heads.py", ["--calls", "1", "--rounds", "1"], lambda report: report["events_per_s"]),
])
def test_a_benchmark_runs_on_a_conditioned_model(script, arguments, rate, run_python):
  process = run_python(str(REPO / "scripts" / script), *arguments, *CONDITIONED, cwd=REPO / "scripts")
  assert process.returncode == 0, process.stderr
  report = json.loads(process.stdout.splitlines()[-1])
  assert report["overrides"] == CONDITIONED[2:] and rate(report) > 0
