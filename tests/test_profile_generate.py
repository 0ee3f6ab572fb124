"""scripts/profile_generate.py at tiny shapes: it traces the real sampler and names the ops that took longest."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_profile_lists_the_sampler_s_ops_per_step(run_python):
  process = run_python(str(REPO / "scripts" / "profile_generate.py"), "--config", "tiny", "--batch", "4",
                       "--length", "8", "--calls", "1", "--top", "5", cwd=REPO / "scripts")
  assert process.returncode == 0, process.stderr
  lines = process.stdout.splitlines()
  assert "distribution heads), B = 4" in lines[0]
  rows = [line for line in lines if re.match(r"\s+\d+\.\d+\s+\d+\.\d\s+\S", line)]
  assert 0 < len(rows) <= 5 and any("sample_compiled" in row for row in rows)
  total = re.search(r"all traced ops: ([\d.]+) ms per step", process.stdout)
  assert total and float(total.group(1)) > 0
