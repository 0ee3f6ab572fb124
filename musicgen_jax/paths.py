"""Where runs, prepared data and generated files live by default (under $MUSICGEN_HOME, ~/musicgen) and where
the bundled configs live, and whether a folder can be written before any work that would end in writing there
starts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from musicgen_jax.errors import UserError

HOME_ENV = "MUSICGEN_HOME"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def bundled_configs() -> list[str]:
  """The names of the configs that ship in configs/, `default` first: what `--config NAME` accepts."""
  names = sorted(path.stem for path in CONFIGS_DIR.glob("*.py") if not path.stem.startswith("_"))
  return sorted(names, key=lambda name: name != "default")


def home() -> Path:
  """The root of everything musicgen writes by default; set $MUSICGEN_HOME to move it."""
  return Path(os.environ.get(HOME_ENV) or Path.home() / "musicgen").expanduser()


def runs_dir() -> Path:
  return home() / "runs"


def data_dir() -> Path:
  return home() / "data"


def outputs_dir() -> Path:
  return home() / "generated"


def check_writable(folder: str | os.PathLike, what: str) -> None:
  """Raises a UserError unless files can be made in `folder` or, if it does not exist yet, in the nearest
  folder above it that does; `what` names it in the message. Leaves nothing behind (an unnamed temporary
  file is opened and closed).
  """
  existing = Path(folder).absolute()
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f"cannot create {what} {folder}: {existing} is a file, not a folder")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    raise UserError(f"cannot write in {what} {folder} ({error.strerror or error}): "
                    "make it writable or choose another folder") from None
