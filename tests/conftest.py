"""Shared test set-up: absl flags marked parsed (grain reads them), quick compiles and one compilation cache
for the whole run, and the MAESTRO location."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_READ_WARNING = "ignore:Error reading persistent compilation cache entry"


def share_compilation_cache() -> None:
  """Every test process and the commands the tests start write and read one persistent compilation cache, so
  a program compiled once (the tiny config's train step, a subprocess's start-up) is not compiled again by
  the next test, worker or command that builds the same one. Set here, before jax is imported, the
  environment carries it to xdist's workers and to subprocesses; the process that made it removes it.
  A cache the caller already set is used as it is.

  jax writes an entry in place, so a process killed while writing one (the kill tests) or reading one
  being written leaves or reads a truncated entry: jax then warns and compiles again. The warning is
  silenced in every process, since tests check that a command's stderr holds exactly its own lines."""
  filters = os.environ.get("PYTHONWARNINGS", "")
  if CACHE_READ_WARNING not in filters:
    os.environ["PYTHONWARNINGS"] = f"{filters},{CACHE_READ_WARNING}".strip(",")
  if COMPILATION_CACHE_ENV in os.environ:
    return
  folder = tempfile.mkdtemp(prefix="musicgen-jax-tests-cache-")
  os.environ.update({COMPILATION_CACHE_ENV: folder, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  atexit.register(shutil.rmtree, folder, ignore_errors=True)


share_compilation_cache()

# XLA's CPU backend compiles without LLVM's optimisations: the tests' programs are tiny and compiled once or
# twice each, so compiling took most of the suite's time (half as long this way); what they compute is the
# same program. Set in the environment, like the cache, so that xdist's workers and subprocesses use it too.
QUICK_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def with_xla_flag(environment: dict[str, str], flag: str) -> dict[str, str]:
  """`environment` with `flag` added to its XLA_FLAGS (once)."""
  current = environment.get("XLA_FLAGS", "")
  return environment if flag in current.split() else {**environment, "XLA_FLAGS": f"{current} {flag}".strip()}


os.environ.update(with_xla_flag(dict(os.environ), QUICK_COMPILE_FLAG))


@pytest.fixture
def four_cpu_devices() -> dict[str, str]:
  """The environment of a subprocess whose JAX sees four CPU devices, the tests' other settings kept."""
  return {**with_xla_flag(dict(os.environ), "--xla_force_host_platform_device_count=4"), "JAX_PLATFORMS": "cpu"}

MAESTRO_ENV = "MUSICGEN_MAESTRO"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MAESTRO = REPO / ".." / "shared" / "maestro-v3.0.0"


def maestro_root() -> Path | None:
  """The MAESTRO v3 root: $MUSICGEN_MAESTRO, else ../shared/maestro-v3.0.0 beside the checkout."""
  root = Path(os.environ.get(MAESTRO_ENV, DEFAULT_MAESTRO)).resolve()
  return root if (root / "maestro-v3.0.0.csv").is_file() else None


@pytest.fixture(scope="session")
def maestro() -> Path:
  """The MAESTRO root, or skip the test with the reason."""
  root = maestro_root()
  if root is None:
    pytest.skip(f"MAESTRO v3.0.0 not found: set {MAESTRO_ENV} or place it at {DEFAULT_MAESTRO}")
  return root


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess]:
  """A function that runs `python ARGS` (a script of `scripts/`, or `-c CODE`) from the folder `cwd` in a new
  process that imports this checkout's `musicgen_jax` and `configs`, as the scripts expect; output as text."""

  def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

  return run


def set_modes(modes: dict[Path, int]) -> None:
  for path, mode in modes.items():
    path.chmod(mode)


@pytest.fixture
def make_read_only():
  """A function that makes a folder, with what it holds, read-only until the test ends: as root (whom chmod
  does not stop) a read-only tmpfs holding a copy is mounted over it, else its permissions are dropped.
  Skips the test where neither can be done.
  """
  undo = []

  def make(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
      modes = {path: path.stat().st_mode for path in [folder, *folder.rglob("*")]}
      set_modes({path: mode & ~0o222 for path, mode in modes.items()})
      undo.append(lambda: set_modes(modes))
      return folder
    copy = Path(tempfile.mkdtemp()) / "copy"
    shutil.copytree(folder, copy)
    try:
      mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True)
    except FileNotFoundError:
      pytest.skip("no mount command: a read-only folder cannot be made for root here")
    if mounted.returncode:
      pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.decode().strip()}): no read-only folder for root here")
    undo.append(lambda: subprocess.run(["umount", "-l", str(folder)], check=False))
    shutil.copytree(copy, folder, dirs_exist_ok=True)
    shutil.rmtree(copy.parent)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder

  yield make
  for step in reversed(undo):
    step()
