"""Atomic writes: a file or folder is written under a temporary name beside its place and renamed into it,
so a kill at any moment leaves the old version or the new one, never half of one.

Temporary names are `.NAME.tmp-PID` (and `.NAME.old-PID` for a folder being replaced), the names
`prepare` clears away after a killed run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def temporary_path(path: Path, kind: str = "tmp") -> Path:
  """The temporary name beside `path` that this process writes (`tmp`) or retires (`old`) it under."""
  return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def remove(path: Path) -> None:
  """Removes a file or folder if it is there."""
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path` for the caller to write (a file or a folder); on success it is
  renamed over `path`, on an exception it is removed and `path` is left as it was.
  """
  path = Path(path)
  tmp = temporary_path(path)
  try:
    yield tmp
  except BaseException:
    remove(tmp)
    raise
  if tmp.is_dir() and path.is_dir():
    old = temporary_path(path, "old")  # os.replace can't replace a folder that holds files.
    path.rename(old)
    tmp.rename(path)
    remove(old)
  else:
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes `text` to `path` atomically; returns the path."""
  with replacing(path) as tmp:
    tmp.write_text(text)
  return Path(path)
