"""Configs as data: load a `get_config()` file, apply `key=value` overrides, save and reload as JSON."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from musicgen_jax import atomic, rundir
from musicgen_jax.errors import UserError
from musicgen_jax.paths import CONFIGS_DIR, bundled_configs

CONFIG_SECTIONS = ("data", "model", "train", "sample")


def config_path(name_or_path: str) -> Path:
  """A config file from a path, or from a bundled name such as `tiny` (configs/tiny.py)."""
  path = Path(name_or_path)
  if path.is_file():
    return path
  bundled = CONFIGS_DIR / f"{name_or_path}.py"
  if bundled.is_file():
    return bundled
  raise UserError(f"config {name_or_path!r} not found: give a path to a config file or one of {bundled_configs()}")


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
  """Runs the config file's `get_config()` (config files are the user's own Python) and locks it."""
  path = config_path(name_or_path).resolve()
  spec = importlib.util.spec_from_file_location(f"_musicgen_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  with _importable(path.parent.parent):
    spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"{path} has no get_config(): a config file defines get_config() returning a ConfigDict")
  config = module.get_config()
  config.lock()
  return config


@contextlib.contextmanager
def _importable(folder: Path):
  """Lets a config file import its siblings as `configs.<name>`, as the Flax examples do."""
  sys.path.insert(0, str(folder))
  try:
    yield
  finally:
    sys.path.remove(str(folder))


def _parse_value(text: str, current: Any) -> Any:
  """Reads an override's value as a Python literal (never evaluated code), typed like the current one."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, bool):
    if isinstance(value, bool):
      return value
    if str(value).lower() in ("true", "false", "1", "0"):
      return str(value).lower() in ("true", "1")
    raise ValueError(f"expected true or false, got {text!r}")
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, str):
    return text
  if isinstance(current, tuple) and isinstance(value, list):
    return tuple(value)
  if current is not None and not isinstance(value, type(current)):
    raise ValueError(f"expected a {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `key=value` overrides to a copy; an unknown key or a badly typed value is a UserError."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.lock()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise UserError(f"override {item!r} is not key=value (for example train.steps=1000)")
    parent, _, leaf = key.rpartition(".")
    node = config
    try:
      for part in filter(None, parent.split(".")):
        node = node[part]
      current = node[leaf]
    except (KeyError, AttributeError, TypeError):
      raise UserError(f"unknown config key {key!r}: see `musicgen config` for the keys") from None
    if isinstance(current, ml_collections.ConfigDict):
      raise UserError(f"{key!r} is a group of settings: override one of its keys, e.g. {key}.<name>=...")
    try:
      node[leaf] = _parse_value(text, current)
    except (ValueError, TypeError) as error:
      raise UserError(f"bad value for {key}: {error}") from None
  return config


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
  """Writes the config into the run folder as JSON (atomically), so a run never needs its flags again."""
  path = rundir.config_file(workdir)
  try:
    atomic.write_text(path, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
  except OSError as error:
    raise UserError(f"could not write {path}: {error.strerror}: free space or make the run folder writable") from None
  return path


def _tuples(value: Any) -> Any:
  """JSON has no tuples: turn lists back into tuples, as the config files write them."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config saved in a run folder, locked; a UserError if the folder holds no run."""
  path = rundir.config_file(workdir)
  if not path.is_file():
    raise UserError(f"{workdir} holds no run (no {rundir.CONFIG_FILE}): "
                    f"train one with `musicgen train --workdir {workdir}`")
  try:
    loaded = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise UserError(f"{path} is not valid JSON ({error}): restore it or start a new run folder") from None
  if not isinstance(loaded, dict) or not all(isinstance(loaded.get(k), dict) for k in CONFIG_SECTIONS):
    raise UserError(f"{path} is not a musicgen config (it lacks the {', '.join(CONFIG_SECTIONS)} settings): "
                    "restore it or start a new run folder")
  config = ml_collections.ConfigDict(_tuples(loaded))
  config.lock()
  return config


def model_differences(saved: ml_collections.ConfigDict, asked: ml_collections.ConfigDict) -> list[str]:
  """The `model.*` settings that differ between two configs, as `key: saved -> asked` lines, but for
  `model.recurrence`: it changes how the LSTM runs, not its parameters, so a resumed run may change it."""
  keys = sorted((set(saved.model.keys()) | set(asked.model.keys())) - {"recurrence"})
  return [f"model.{k}: {saved.model.get(k)!r} -> {asked.model.get(k)!r}"
          for k in keys if saved.model.get(k) != asked.model.get(k)]


def run_config(workdir: str | os.PathLike, config_name: str | None, data: str | os.PathLike | None,
               overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config a training invocation runs: the run's saved one on resume, else `config_name`, plus overrides.

  Resuming with a different model shape is a UserError: the checkpoint could not be restored into it.
  """
  saved = rundir.is_run(workdir)
  base = read_config(workdir) if saved else load_config(config_name or "default")
  extra = [f"data.dir={Path(data).resolve()}"] if data else []
  config = apply_overrides(base, [*extra, *overrides])
  if saved:
    asked = apply_overrides(load_config(config_name), overrides) if config_name else config
    changed = model_differences(base, asked)
    if changed:
      raise UserError(f"{workdir} was trained with another model shape ({'; '.join(changed)}): "
                      "resume without changing model.* or use a new --workdir")
  return config
