"""`musicgen evaluate`: a run's checkpoint scored on the fixed windows of a held-out split."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from musicgen_jax import paths, store
from musicgen_jax.errors import UserError


def prepared_data(data: str | os.PathLike, sustain: bool) -> Path:
  """`data` itself if `musicgen prepare` wrote it, else a cached preparation of that MIDI folder or root."""
  data = Path(data)
  if store.is_complete(data):
    return data
  if not data.exists():
    raise UserError(f"{data} does not exist: give a prepared folder, a MIDI folder or a MAESTRO root")
  from musicgen_jax import prepare

  key = hashlib.sha256(f"{data.resolve()}|{sustain}".encode()).hexdigest()[:16]
  out = paths.data_dir() / f"evaluate-{key}"
  prepare.prepare_corpus([str(data)], out, workers=os.cpu_count() or 1, filter_text=None, sustain=sustain)
  return out


def evaluate_run(workdir: str | os.PathLike, data: str | os.PathLike, *, split: str = "validation",
                 checkpoint: str | int = "latest") -> dict[str, Any]:
  """The metrics of one checkpoint (`steps.Trainer.evaluate`) and its `step`: per-component NLL in nats/event
  (pitch, time, velocity; for regression heads from the Laplace and Gaussian fitted on `split`), the
  total, bits per note and per second, pitch accuracy and, for regression heads, dt MAE and velocity RMSE; and
  the `condition` they are conditional on (`model.condition`: the controls read, each window's own)."""
  from musicgen_jax import checkpointing, config_checks, input_pipeline, steps
  from musicgen_jax import config as config_lib

  run_config = config_lib.read_config(workdir)
  config_checks.check(run_config)
  data_dir = prepared_data(data, run_config.data.sustain)
  if not store.has_split(data_dir, split):
    raise UserError(f"{data_dir} has no {split!r} split: choose one with --split (e.g. train, validation)")
  run = checkpointing.load_run(workdir, checkpoint)
  trainer = steps.Trainer(run.config)
  metrics = trainer.evaluate(run.params, input_pipeline.eval_batches(run.config, data_dir, split), fit_likelihood=True)
  return {**metrics, "step": run.step, "condition": run.config.model.get("condition", "none")}
