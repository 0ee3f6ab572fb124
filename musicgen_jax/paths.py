"""Where runs, prepared data and generated files live by default: under $MUSICGEN_HOME (~/musicgen)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MUSICGEN_HOME"


def home() -> Path:
  """The root of everything musicgen writes by default; set $MUSICGEN_HOME to move it."""
  return Path(os.environ.get(HOME_ENV) or Path.home() / "musicgen").expanduser()


def runs_dir() -> Path:
  return home() / "runs"


def data_dir() -> Path:
  return home() / "data"


def outputs_dir() -> Path:
  return home() / "generated"
