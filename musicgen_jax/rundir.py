"""The layout of a run folder: where a run's config, metrics, checkpoints, lock, samples and TensorBoard
logs live, named once for every module that reads or writes them.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"


def config_file(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / CONFIG_FILE


def metrics_file(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / METRICS_FILE


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / CHECKPOINT_DIR


def lock_file(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / LOCK_FILE


def samples_dir(workdir: str | os.PathLike, step: int) -> Path:
  """Where the samples written at training step `step` go."""
  return Path(workdir) / SAMPLES_DIR / f"step_{step}"


def tensorboard_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / TENSORBOARD_DIR


def curves_file(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / CURVES_FILE


def is_run(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a run: training has saved its config there."""
  return config_file(workdir).is_file()
