"""The prepared event corpus on disk: per split, all events concatenated plus per-piece offsets.

Each split is a folder of plain `.npy` arrays, memory-mapped when read so that grain workers
share the page cache instead of copying the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from musicgen_jax import atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"  # Written last: a store without it is incomplete and never read.
FIELDS = ("pitch", "dt", "velocity")
DTYPES = {"pitch": np.uint8, "dt": np.float32, "velocity": np.uint8}


@dataclasses.dataclass(frozen=True)
class Events:
  """One event stream: `pitch` 0-127, `dt` seconds since the previous event, `velocity` (0 = release)."""

  pitch: np.ndarray
  dt: np.ndarray
  velocity: np.ndarray

  def __len__(self) -> int:
    return len(self.pitch)

  @classmethod
  def concatenate(cls, pieces: Sequence["Events"]) -> "Events":
    return cls(*(np.concatenate([getattr(p, f) for p in pieces]).astype(DTYPES[f]) if pieces
                 else np.zeros(0, DTYPES[f]) for f in FIELDS))


@dataclasses.dataclass(frozen=True)
class EventStore:
  """A split opened from disk: `events` of all pieces back to back, piece i at offsets[i]:offsets[i+1]."""

  events: Events
  offsets: np.ndarray

  @property
  def num_pieces(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def piece(self, index: int) -> Events:
    start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
    return Events(*(getattr(self.events, f)[start:stop] for f in FIELDS))


def split_dir(root: str | os.PathLike, split: str) -> Path:
  return Path(root) / split


def is_complete(root: str | os.PathLike) -> bool:
  """Whether `root` is a finished store: its manifest, written last, is in place."""
  return bool(root) and (Path(root) / MANIFEST).is_file()


def has_split(root: str | os.PathLike, split: str) -> bool:
  """Whether `root` is a finished store holding a split of that name."""
  return is_complete(root) and (split_dir(root, split) / "offsets.npy").is_file()


def write_manifest(root: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
  """Writes the manifest atomically, as the last step of writing a store: it marks the store complete."""
  atomic.write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def write_corpus(root: str | os.PathLike, splits: Mapping[str, Sequence[Events]]) -> Path:
  """Writes a whole store from events in memory (splits, then a minimal manifest); for tools and tests."""
  Path(root).mkdir(parents=True, exist_ok=True)
  for name, pieces in splits.items():
    write_split(root, name, pieces)
  write_manifest(root, {"format_version": FORMAT_VERSION,
                        "splits": {name: {"files": len(pieces), "events": sum(map(len, pieces))}
                                   for name, pieces in splits.items()}})
  return Path(root)


def write_split(root: str | os.PathLike, split: str, pieces: Sequence[Events]) -> Path:
  """Writes the pieces of one split atomically: a temporary folder renamed into place."""
  final = split_dir(root, split)
  merged = Events.concatenate(pieces)
  offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)]).astype(np.int64)
  with atomic.replacing(final) as tmp:
    tmp.mkdir(parents=True, exist_ok=True)
    for field in FIELDS:
      np.save(tmp / f"{field}.npy", getattr(merged, field))
    np.save(tmp / "offsets.npy", offsets)
  return final


def open_split(root: str | os.PathLike, split: str) -> EventStore:
  """Opens one split memory-mapped, read-only."""
  folder = split_dir(root, split)
  arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in (*FIELDS, "offsets")}
  return EventStore(Events(*(arrays[f] for f in FIELDS)), np.asarray(arrays["offsets"]))
