"""scripts/bench_accelerator.py at tiny shapes, in a process where grain, note-seq, orbax and tensorboardX
cannot be imported (a GPU machine may lack them): every case it can run here runs, the others say why."""

import json
import math
from pathlib import Path

from musicgen_jax import cudnn_lstm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_accelerator.py"
BLOCKED = ("grain", "note_seq", "orbax", "tensorboardX")


def test_smoke_run_writes_every_case_without_the_training_loop_imports(tmp_path, run_python):
  out = tmp_path / "bench.json"
  wrapper = "\n".join([
      "import runpy, sys",
      f"sys.modules.update(dict.fromkeys({BLOCKED!r}))",  # None in sys.modules: importing it raises.
      f"sys.path.insert(0, {str(SCRIPT.parent)!r})",
      f"sys.argv = [{str(SCRIPT)!r}, '--smoke', '--budget-s', '3600', '--out', {str(out)!r}]",
      "runpy.run_path(sys.argv[0], run_name='__main__')",
  ])
  process = run_python("-c", wrapper, cwd=tmp_path)
  assert process.returncode == 0, process.stderr
  assert "training events/s" in process.stdout and "generation events/s" in process.stdout
  result = json.loads(out.read_text())
  runnable = ["scan", "fused"] + (["cudnn"] if cudnn_lstm.platform() else [])
  trained = {(row["recurrence"], row["dtype"]) for row in result["train"]}
  assert {(r, "float32") for r in runnable} <= trained
  assert {r for r, _ in trained} == set(runnable)
  assert {row["recurrence"] for row in result["generate"]} == set(runnable)
  for row in result["train"] + result["generate"]:
    assert "error" not in row, row
    assert row["events_per_s"] > 0 and row["compile_s"] > 0
  assert all(math.isfinite(row["mean_loss"]) for row in result["train"])
  if not cudnn_lstm.platform():
    skipped = {(row["case"], row["recurrence"]) for row in result["skipped"]}
    assert skipped == {("train", "cudnn"), ("generate", "cudnn")}
    assert all("needs a CUDA or ROCm GPU" in row["reason"] for row in result["skipped"])
    assert result["torch_train"] == [] and result["torch_skipped"]
  assert result["auto"]["float32"] in runnable
