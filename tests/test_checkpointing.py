"""Checkpoint failures: a full or read-only disk while saving, damaged and foreign checkpoints, bad configs."""

import errno
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musicgen_jax import checkpointing, cli, generate, steps, store
from musicgen_jax.config import apply_overrides, load_config, save_config
from musicgen_jax.errors import UserError
from tests.test_train import scale_corpus

GLOG_LINE = re.compile(r"[IWEF]\d{4} ")  # C++ log lines of XLA and tensorstore, not musicgen's
STEPS = ("train.steps=40", "train.checkpoint_every=20", "train.log_every=40", "train.eval_every=1000")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("corpus")
  store.write_corpus(root, {"train": scale_corpus(0), "validation": scale_corpus(1, pieces=2)})
  return root


def mount_tmpfs(folder: Path, size: str) -> None:
  """Mounts a `size` tmpfs at `folder`; skips the test where that is not allowed (not root, no mount)."""
  folder.mkdir(parents=True)
  try:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
  except FileNotFoundError:
    pytest.skip("no mount command: a real full or read-only disk cannot be made here")
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs ({result.stderr.strip()}): a real full or read-only disk needs root")


def fill(folder: Path) -> None:
  """Writes into `folder` until its file system is full (one already full refuses even the new file)."""
  try:
    with (folder / "filler").open("wb") as filler:
      while True:
        filler.write(b"\0" * (1 << 16))
        filler.flush()
  except OSError as error:
    assert error.errno == errno.ENOSPC


def break_disk_after_first_checkpoint(checkpoints: Path, how: str):
  """A `stop` hook for training: once checkpoint 20 is complete, fills or write-protects its folder (at the
  first call after step 20: the hook is called once per execution of several steps). Complete means orbax's
  last files are in it and no temporary folder is left: the folder alone appears before its metadata."""
  broken = []

  def complete() -> bool:
    written = all((checkpoints / "20" / name).is_file() for name in ("_CHECKPOINT_METADATA", "commit_success.txt"))
    return written and not any("tmp" in entry.name for entry in checkpoints.iterdir())

  def stop(step: int) -> bool:
    if step > 20 and not broken:
      broken.append(step)
      deadline = time.time() + 60
      while not complete() and time.time() < deadline:
        time.sleep(0.05)
      if how == "full":
        fill(checkpoints)
      else:
        subprocess.run(["mount", "-o", "remount,ro", str(checkpoints)], check=True)
    return False
  return stop


FAILING_TRAIN = """
import functools, sys
from pathlib import Path
from musicgen_jax import cli, train
from tests.test_checkpointing import STEPS, break_disk_after_first_checkpoint

corpus, workdir, how = sys.argv[1:]
train.train_and_evaluate = functools.partial(
    train.train_and_evaluate, stop=break_disk_after_first_checkpoint(Path(workdir) / "checkpoints", how))
sys.exit(cli.main(["train", "--workdir", workdir, "--config", "tiny", "--data", corpus, "--quiet", *STEPS]))
"""


@pytest.mark.parametrize("how, reason, hint", [
    ("full", "No space left on device (errno 28)", "free space"),
    ("read-only", "Read-only file system (errno 30)", "make it writable"),
])
def test_a_failed_checkpoint_write_is_one_line_and_the_previous_one_restores(corpus, tmp_path, how, reason, hint):
  """Real faults, not mocks: the run's checkpoints folder is a 16 MiB tmpfs that is filled, or remounted
  read-only (chmod would not stop root), once checkpoint 20 is written; checkpoint 40 then fails. The
  command runs in a subprocess so that all it prints on stderr is seen.
  """
  workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
  mount_tmpfs(checkpoints, "16m")
  try:
    result = subprocess.run([sys.executable, "-c", FAILING_TRAIN, str(corpus), str(workdir), how],
                            capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    err = "".join(line for line in result.stderr.splitlines(keepends=True) if not GLOG_LINE.match(line))
    assert result.returncode == 2, result.stderr[-3000:]
    assert err == (f"musicgen: error: could not write checkpoint 40 to {checkpoints}: {reason}: {hint} or point "
                   "--workdir elsewhere; checkpoint 20 is intact\n")
    assert checkpointing.load_run(workdir).step == 20
  finally:
    subprocess.run(["umount", "-l", str(checkpoints)], check=False)


def make_run(workdir: Path, corpus: Path, hidden: int) -> None:
  """A run folder with checkpoints 1 and 2 of an untrained model of width `hidden`: no training needed."""
  config = apply_overrides(load_config("tiny"), [f"data.dir={corpus}", f"model.hidden={hidden}", "model.embed=8",
                                                 "sample.release_threshold=40", "train.steps=3"])
  workdir.mkdir(parents=True)
  save_config(config, workdir)
  _, state = steps.create_train_state(config)
  with checkpointing.closing(checkpointing.checkpoint_manager(workdir)) as manager:
    for step in (1, 2):
      checkpointing.save(manager, step, state, None)


def overwrite_array_data(workdir: Path) -> None:
  for chunk in (workdir / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d").iterdir():
    chunk.write_bytes(b"garbage" * 10)


def truncate_manifest(workdir: Path) -> None:
  (workdir / "checkpoints" / "2" / "state" / "manifest.ocdbt").write_bytes(b"")


def remove_state(workdir: Path) -> None:
  shutil.rmtree(workdir / "checkpoints" / "2" / "state")


def copy_foreign_step(workdir: Path) -> None:
  """Checkpoint 2 replaced by one of a run whose model.hidden is 16."""
  make_run(workdir.parent / "foreign", workdir.parent / "corpus", 16)
  shutil.rmtree(workdir / "checkpoints" / "2")
  shutil.copytree(workdir.parent / "foreign" / "checkpoints" / "2", workdir / "checkpoints" / "2")


def edit_config_width(workdir: Path) -> None:
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["hidden"] = 16
  (workdir / "config.json").write_text(json.dumps(config))


def garble_config(workdir: Path) -> None:
  (workdir / "config.json").write_text("{not json")


@pytest.mark.parametrize("damage, message", [
    (overwrite_array_data, "checkpoint 2 in {checkpoints} is damaged or incomplete (OUT_OF_RANGE"),
    (truncate_manifest, "checkpoint 2 in {checkpoints} is damaged or incomplete (DATA_LOSS"),
    (remove_state, "checkpoint 2 in {checkpoints} is damaged or incomplete ('Item \"state\" was not found"),
    (copy_foreign_step, "checkpoint 2 in {checkpoints} does not fit this model (Requested shape"),
    (edit_config_width, "checkpoint 2 in {checkpoints} does not fit this model (Requested shape"),
    (garble_config, "config.json is not valid JSON"),
])
@pytest.mark.parametrize("command", ["generate", "evaluate", "train"])
def test_a_bad_checkpoint_or_config_is_one_line_and_exit_2(corpus, tmp_path, capfd, command, damage, message):
  """Damaged, foreign or mismatched checkpoints and configs, as each command meets them (training resumes)."""
  (tmp_path / "corpus").symlink_to(corpus)
  workdir = tmp_path / "run"
  make_run(workdir, corpus, 32)
  damage(workdir)
  options = {"generate": ["--out", str(tmp_path / "out"), "--num", "1", "--length", "8", "--quiet"],
             "evaluate": ["--data", str(corpus)], "train": ["--quiet"]}[command]
  code = cli.main([command, "--workdir", str(workdir), *options])
  err = "".join(line for line in capfd.readouterr().err.splitlines(keepends=True) if not GLOG_LINE.match(line))
  assert code == 2
  assert err.startswith("musicgen: error: ") and err.count("\n") == 1, err[-3000:]
  assert message.format(checkpoints=workdir / "checkpoints") in err


PEAK_RSS = """
import resource, sys
from musicgen_jax import generate

generate.generate(sys.argv[1], sys.argv[2], num=int(sys.argv[3]), length=64, batch_size=64, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(workdir: Path, out: Path, num: int) -> int:
  result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(workdir), str(out), str(num)], capture_output=True,
                          text=True, timeout=300, check=True)
  return int(result.stdout.split()[-1])


@pytest.mark.parametrize("small, large", [
    pytest.param(64, 640, id="10x"),
    pytest.param(200, 2000, id="2000", marks=pytest.mark.slow),
])
def test_generation_memory_does_not_grow_with_the_number_of_files(corpus, tmp_path, small, large):
  """Peak RSS of a fresh process writing `large` files is within 10% of one writing `small`: batches are
  written as they finish, nothing accumulates.
  """
  make_run(tmp_path / "run", corpus, 32)
  baseline = peak_rss_kib(tmp_path / "run", tmp_path / "small", small)
  peak = peak_rss_kib(tmp_path / "run", tmp_path / "large", large)
  assert len(list((tmp_path / "large").glob("*.mid"))) == large
  assert peak < 1.1 * baseline, (baseline, peak)


@pytest.mark.parametrize("prefix", ["a/b", "../escape", "..", "/abs", "nul\0byte", "back\\slash", ""])
def test_output_names_never_leave_the_out_folder(tmp_path, prefix):
  """A prefix that is a path, or has a NUL, is refused; any accepted one names files inside --out."""
  options = dict(num=3, length=8, seconds=None, batch_size=2, temperature=1.0, time_temperature=1.0,
                 velocity_temperature=1.0, top_k=0, top_p=1.0, seed=0, primer=None, primer_events=None,
                 keep_primer=False)
  out = tmp_path / "out"
  try:
    generate.check_options(**options, prefix=prefix)
  except UserError:
    return
  for path in generate.output_paths(out, prefix, 3):
    assert path.resolve().parent == out.resolve(), path
