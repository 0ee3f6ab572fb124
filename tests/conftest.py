"""Shared test set-up: absl flags marked parsed (grain reads them) and the MAESTRO location."""

import os
from pathlib import Path

import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

MAESTRO_ENV = "MUSICGEN_MAESTRO"
DEFAULT_MAESTRO = Path(__file__).resolve().parents[1] / ".." / "shared" / "maestro-v3.0.0"


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
