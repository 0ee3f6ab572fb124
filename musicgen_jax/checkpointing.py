"""orbax checkpoints of a run: the train state and the data iterator position, last k plus the best,
and `load_run`, a trained run's config and parameters ready for inference.

A checkpoint is written to a temporary folder and renamed into place by orbax, so a kill at any
moment leaves the previous checkpoints intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from musicgen_jax import config_checks, cudnn_lstm, rundir
from musicgen_jax.config import apply_overrides, read_config
from musicgen_jax.errors import UserError
from musicgen_jax.steps import create_train_state

DELETED_DIR = ".deleted"  # Old checkpoints are renamed here (atomic), then purged.
BEST_METRICS = ("total_nll", "pitch_nll")  # The first the evaluation reports ranks checkpoints (lower is better).
TENSORSTORE_DAMAGE = re.compile(r"(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND): ")  # status codes of unreadable files
MAX_REASON = 200  # characters of an error message quoted in a one-line report


ORBAX_CODE = f"{os.sep}orbax{os.sep}"


class OrbaxFailureLogs(logging.Filter):
  """Drops orbax's logged errors and asyncio's reports of the futures it abandons: each failure of orbax's
  background threads is also raised, and musicgen reports what is raised as one line. musicgen runs no
  coroutines of its own, so every asyncio error is orbax's.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or not (record.name == "asyncio" or ORBAX_CODE in record.pathname)


def drop_closed_loop_reports(report: Any, previous: Any = sys.unraisablehook) -> None:
  """An unraisable-exception hook: drops the reports of reads and writes orbax abandons when a save or
  restore fails (they find its event loop closed); passes everything else on.
  """
  if not (isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"):
    previous(report)


def quiet_orbax_failures() -> None:
  """Keeps orbax's reports of a failure off stderr, so that a failed save or restore is one line."""
  for logger in ("absl", "asyncio"):
    logging.getLogger(logger).addFilter(ORBAX_FAILURE_LOGS)
  sys.unraisablehook = drop_closed_loop_reports
  # As above, the unawaited coroutines are orbax's, abandoned by a failed save.
  warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)


ORBAX_FAILURE_LOGS = OrbaxFailureLogs()


def best_metric(metrics: dict[str, float]) -> float:
  """The validation figure that ranks checkpoints: the total NLL where it is known (distribution heads), else the
  pitch NLL."""
  return next(metrics[name] for name in BEST_METRICS if name in metrics)


def checkpoint_manager(workdir: str | os.PathLike, keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's manager: keeps the last `keep` checkpoints and the one with the lowest validation NLL."""
  directory = rundir.checkpoint_dir(Path(workdir).resolve())
  if read_only and not directory.is_dir():
    raise UserError(f"{workdir} has no checkpoints: train it first with `musicgen train --workdir {workdir}`")
  quiet_orbax_failures()
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=best_metric, reverse=True, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, read_only=read_only, create=not read_only,
      best_fn=best_metric, best_mode="min",
      todelete_subdir=None if read_only else DELETED_DIR)
  if not read_only:
    purge_deleted(directory)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def purge_deleted(directory: Path) -> None:
  """Removes checkpoints that orbax has retired (renamed whole into DELETED_DIR, no longer listed), so a
  kill here loses nothing; entries are removed one by one because orbax may be renaming another in.
  """
  retired = directory / DELETED_DIR
  for entry in retired.iterdir() if retired.is_dir() else ():
    shutil.rmtree(entry, ignore_errors=True)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any] | None,
         metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of `state` (a pytree) and the iterator position; `metrics` rank it.

  A failure of the previous save surfaces here, as a CheckpointWriteError.
  """
  finish(manager)
  purge_deleted(Path(manager.directory))
  items = {"state": ocp.args.StandardSave(state)}
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (full disk, read-only folder); the earlier ones are intact."""


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the save under way; an OS error writing it becomes a CheckpointWriteError saying why."""
  pending = manager.latest_step()  # orbax lists a step as soon as its save starts, unlists it if it fails
  try:
    manager.wait_until_finished()
  except OSError as error:
    intact = manager.latest_step()
    hint = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    kept = f"checkpoint {intact} is intact" if intact is not None else "no earlier checkpoint exists"
    raise CheckpointWriteError(
        f"could not write checkpoint {pending} to {manager.directory}: {error.strerror or error} "
        f"(errno {error.errno}): {hint} or point --workdir elsewhere; {kept}") from None


@contextlib.contextmanager
def closing(manager: ocp.CheckpointManager) -> Iterator[ocp.CheckpointManager]:
  """Closes `manager` on exit, after its last save (see `finish`). After a failed write it is left open:
  orbax raises that failure again on every wait, and it has been reported already.
  """
  failed_write = False
  try:
    yield manager
  except CheckpointWriteError:
    failed_write = True
    raise
  finally:
    if not failed_write:
      finish(manager)
      manager.close()


def resolve_step(manager: ocp.CheckpointManager, which: str | int = "latest") -> int:
  """The step named by `which`: `latest`, `best` or a step number that the manager holds."""
  steps = list(manager.all_steps())
  if not steps:
    raise UserError(f"no checkpoint in {manager.directory}: train the run first")
  if which == "latest":
    return max(steps)
  if which == "best":
    best = manager.best_step()
    if best is None:
      raise UserError("no checkpoint has a validation score yet: use --checkpoint latest")
    return best
  try:
    step = int(which)
  except ValueError:
    raise UserError(f"--checkpoint must be latest, best or a step number, not {which!r}") from None
  if step not in steps:
    raise UserError(f"no checkpoint at step {step}: the run has steps {sorted(steps)}")
  return step


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            with_data: bool = True) -> tuple[Any, dict[str, Any] | None]:
  """Restores the state (shaped like `abstract_state`) and, if saved and asked for, the iterator position."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  has_data = with_data and (Path(manager.directory) / str(step) / "data").exists()
  if has_data:
    items["data"] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:
    problem = restore_problem(error)
    if problem is None:
      raise
    raise UserError(problem_message(manager, step, problem, error)) from None
  return restored["state"], restored["data"] if has_data else None


def restore_problem(error: Exception) -> str | None:
  """Why a restore raised `error`: `damaged` (unreadable files, a missing item), `misfit` (other shapes or
  structure than the model), or None when it is no fault of the checkpoint.
  """
  if type(error) is Exception and isinstance(error.__cause__, ValueError):
    error = error.__cause__  # orbax wraps tensorstore's failure to read an array in a bare Exception
  if isinstance(error, (json.JSONDecodeError, KeyError, FileNotFoundError)):
    return "damaged"
  if isinstance(error, ValueError) and TENSORSTORE_DAMAGE.match(str(error)):
    return "damaged"
  return "misfit" if isinstance(error, (ValueError, TypeError)) else None


def problem_message(manager: ocp.CheckpointManager, step: int, problem: str, error: Exception) -> str:
  """One line saying what is wrong with checkpoint `step` and what to do."""
  text = str(error.__cause__ if type(error) is Exception and error.__cause__ else error).strip()
  reason = (text.splitlines()[0][:MAX_REASON] if text else type(error).__name__).rstrip(":")
  if problem == "misfit":
    return (f"checkpoint {step} in {manager.directory} does not fit this model ({reason}): "
            "check that the run's config.json matches the checkpoint")
  steps = sorted(manager.all_steps())
  return (f"checkpoint {step} in {manager.directory} is damaged or incomplete ({reason}): delete "
          f"{Path(manager.directory) / str(step)} to go back to an earlier one (the run has steps {steps})")


def abstract(state: Any) -> Any:
  """Shapes, dtypes and shardings of a pytree of arrays (a train state): the target a checkpoint restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class LoadedRun(NamedTuple):
  """A trained run ready for inference: its saved config, the model's graph and parameters, the step."""

  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: nnx.State
  step: int


def load_run(workdir: str | os.PathLike, checkpoint: str | int = "latest") -> LoadedRun:
  """Loads a run folder's config and the parameters of one checkpoint (`latest`, `best` or a step)."""
  if not Path(workdir).is_dir():
    raise UserError(f"run folder {workdir} does not exist: train one with `musicgen train --workdir {workdir}`")
  config = read_config(workdir)
  config_checks.check(config)
  if config.model.get("recurrence") == "cudnn" and not cudnn_lstm.platform():
    # The recurrence changes no parameter: a run trained with cuDNN generates and evaluates anywhere.
    config = apply_overrides(config, ["model.recurrence=auto"])
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    step = resolve_step(manager, checkpoint)
    graphdef, initial = create_train_state(config)
    state, _ = restore(manager, step, abstract(initial), with_data=False)
  finally:
    manager.close()
  return LoadedRun(config, graphdef, state.params, step)
