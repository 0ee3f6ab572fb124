"""One writer per run folder: an advisory `flock` on RUN/.lock, released by the kernel when the
process ends however it ends, so a lock left by a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from musicgen_jax import rundir
from musicgen_jax.errors import UserError


@contextlib.contextmanager
def run_lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds the run folder's lock for the duration; a UserError if another live process holds it."""
  with open(rundir.lock_file(workdir), "a+") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      owner = handle.read().strip() or "another process"
      raise UserError(f"{workdir} is being trained by {owner}: wait for it to finish, "
                      "or train into another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)
