"""`musicgen prepare`: MIDI sources -> the event store of each split, parsed in parallel with a per-file cache.

A SOURCE is a MAESTRO root (its CSV gives each piece's split), a folder searched recursively for MIDI
files, or a single file; outside MAESTRO a stable hash of the path within its source picks the
validation pieces. `DIR/manifest.json`, written last, marks the store complete.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from musicgen_jax import events, store
from musicgen_jax.errors import UserError

MIDI_SUFFIXES = (".mid", ".midi", ".smf")
SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
CACHE_DIR = ".cache"
CACHE_VERSION = 1  # bump when the events read from a file change


@dataclasses.dataclass(frozen=True)
class Piece:
  """One MIDI file to prepare: its absolute path, its name within its source, its split and filterable text."""

  path: Path
  name: str
  split: str
  text: str


def hash_split(name: str, val_fraction: float) -> str:
  """"validation" for a stable pseudo-random `val_fraction` of names, else "train": the same on every machine."""
  draw = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
  return "validation" if draw < val_fraction else "train"


def maestro_csv(folder: Path) -> Path | None:
  """The (newest) `maestro-v*.csv` of a MAESTRO root, None for other folders."""
  return max(folder.glob("maestro-v*.csv"), default=None)


def maestro_pieces(root: Path, table: Path) -> list[Piece]:
  """The pieces listed in a MAESTRO CSV, each in the split the CSV gives it."""
  with open(table, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if rows and not {"midi_filename", "split"} <= rows[0].keys():
    raise UserError(f"{table} has no midi_filename and split columns: is it really a MAESTRO CSV?")
  return [Piece(Path(os.path.abspath(root / row["midi_filename"])), row["midi_filename"], row["split"],
                f"{row['midi_filename']}\n{row.get('canonical_composer', '')}\n{row.get('canonical_title', '')}")
          for row in rows]


def folder_pieces(folder: Path, val_fraction: float) -> list[Piece]:
  """Every path under `folder` with a MIDI suffix (any case), split by the hash of its path within `folder`."""
  paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES)
  names = [p.relative_to(folder).as_posix() for p in paths]
  return [Piece(Path(os.path.abspath(p)), name, hash_split(name, val_fraction), name) for p, name in zip(paths, names)]


def source_pieces(source: str, val_fraction: float) -> list[Piece]:
  """The pieces of one SOURCE argument; a UserError if it doesn't exist or holds no MIDI file."""
  path = Path(source)
  if not path.exists():
    raise UserError(f"{source} does not exist: give a MAESTRO root, a folder of MIDI files, or MIDI files")
  if not path.is_dir():
    return [Piece(Path(os.path.abspath(path)), path.name, hash_split(path.name, val_fraction), source)]
  table = maestro_csv(path)
  pieces = maestro_pieces(path, table) if table else folder_pieces(path, val_fraction)
  if not pieces:
    raise UserError(f"{source} holds no MIDI files ({', '.join(MIDI_SUFFIXES)}): give a folder that does")
  return pieces


def select_pieces(sources: list[str], val_fraction: float, filter_text: str | None) -> list[Piece]:
  """The pieces of all sources (each file once), those matching `filter_text` if given, case-insensitively."""
  unique: dict[Path, Piece] = {}
  for source in sources:
    for piece in source_pieces(source, val_fraction):
      unique.setdefault(piece.path, piece)
  pieces = list(unique.values())
  if filter_text is None:
    return pieces
  wanted = filter_text.casefold()
  kept = [p for p in pieces if wanted in p.text.casefold()]
  if not kept:
    raise UserError(f"--filter {filter_text!r} matches none of the {len(pieces)} pieces: it is looked for in file "
                    "paths (and MAESTRO composers and titles), ignoring case; check its spelling")
  return kept


def cache_file(cache_dir: Path, path: Path, sustain: bool) -> Path:
  """Where the outcome of reading `path` is cached: keyed by its path, size, mtime, and what reading means."""
  stat = path.stat()
  key = f"{CACHE_VERSION}|{store.FORMAT_VERSION}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{sustain}"
  return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def write_cache(file: Path, outcome: store.Events | str) -> None:
  """Saves events, or the reason a file is unreadable, atomically (a temporary file renamed into place)."""
  arrays = {"reason": np.array(outcome)} if isinstance(outcome, str) else {f: getattr(outcome, f) for f in store.FIELDS}
  tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, file)


def read_cache(file: Path) -> store.Events | str:
  """The events or reason `write_cache` saved (plain arrays only: nothing is unpickled)."""
  with np.load(file, allow_pickle=False) as saved:
    if "reason" in saved:
      return str(saved["reason"])
    return store.Events(*(saved[field] for field in store.FIELDS))


def parse_to_cache(path: Path, sustain: bool, file: Path) -> None:
  """Reads one MIDI file and caches its events or why it can't be read (runs in a worker process)."""
  try:
    outcome = events.midi_to_events(path, sustain=sustain)
  except events.MidiReadError as error:
    outcome = str(error)
  write_cache(file, outcome)


def parse_all(jobs: list[tuple[Path, bool, Path]], workers: int, progress: bool) -> None:
  """Runs `parse_to_cache` on every job, in `workers` spawned processes (JAX threads make fork unsafe)."""
  from tqdm import tqdm

  workers = min(workers, len(jobs))
  with tqdm(total=len(jobs), desc="reading MIDI", unit="file", disable=not progress or not jobs) as bar:
    if workers <= 1:
      for job in jobs:
        parse_to_cache(*job)
        bar.update()
      return
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      for done in futures.as_completed([pool.submit(parse_to_cache, *job) for job in jobs]):
        done.result()
        bar.update()


def read_pieces(pieces: list[Piece], cache_dir: Path, *, sustain: bool, workers: int,
                progress: bool) -> tuple[dict[Piece, store.Events | str], dict[str, int]]:
  """The events of each piece, or why it can't be used; and how many files came from the cache or were parsed."""
  files = {p: cache_file(cache_dir, p.path, sustain) for p in pieces if p.path.exists()}
  jobs = [(p.path, sustain, file) for p, file in files.items() if not file.exists()]
  parse_all(jobs, workers, progress)
  outcomes = {p: read_cache(files[p]) if p in files else "file not found" for p in pieces}
  usable = {p: o if isinstance(o, str) or len(o) else "no notes" for p, o in outcomes.items()}
  return usable, {"hits": len(files) - len(jobs), "parsed": len(jobs)}


def make_out_dir(out_dir: Path) -> None:
  """Creates `out_dir` and its cache; a UserError if it holds anything but an earlier preparation, or can't be made."""
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f"--out {out_dir} is a file: give a folder")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / CACHE_DIR).is_dir():
    raise UserError(f"--out {out_dir} already holds other files: give a new or empty folder")
  try:
    (out_dir / CACHE_DIR).mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"cannot create --out {out_dir} ({error.strerror or error})") from None


def split_order(split: str) -> tuple[int, str]:
  return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
  """Writes `manifest.json` atomically: present only once the whole store is."""
  tmp = out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(manifest, indent=1) + "\n")
  os.replace(tmp, out_dir / MANIFEST)


def write_store(out_dir: Path, kept: dict[str, list[tuple[Piece, store.Events]]]) -> dict[str, Any]:
  """Writes each split (removing splits of an earlier run that this one doesn't have); the manifest's splits."""
  for stale in set(SPLITS) - kept.keys():
    shutil.rmtree(store.split_dir(out_dir, stale), ignore_errors=True)
  splits = {}
  for split in sorted(kept, key=split_order):
    store.write_split(out_dir, split, [piece_events for _, piece_events in kept[split]])
    splits[split] = {"files": len(kept[split]), "events": sum(len(e) for _, e in kept[split]),
                     "pieces": [str(piece.path) for piece, _ in kept[split]]}
  return splits


def summary(skipped: list[dict[str, str]], total: int, manifest: Path) -> str:
  """One line on the skipped files: how many, the commonest reasons, where the full list is."""
  reasons = collections.Counter(s["reason"] for s in skipped).most_common(3)
  listed = ", ".join(f"{count} {reason}" for reason, count in reasons)
  more = ", ..." if len(reasons) < len({s["reason"] for s in skipped}) else ""
  return f"skipped {len(skipped)} of {total} MIDI files ({listed}{more}); all listed in {manifest}"


def prepare_corpus(sources: list[str], out_dir: str | os.PathLike, *, workers: int = 1,
                   filter_text: str | None = None, val_fraction: float = 0.1, sustain: bool = True,
                   progress: bool = True) -> dict[str, Any]:
  """Prepares the event store of MIDI `sources` in `out_dir` and returns its manifest (also `out_dir/manifest.json`).

  Unreadable or empty files are skipped and listed; a UserError if there is nothing usable at all.
  """
  if workers < 1:
    raise UserError(f"--workers must be at least 1, not {workers}")
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"--val-fraction must be in [0, 1), not {val_fraction}")
  out_dir = Path(out_dir)
  pieces = select_pieces(sources, val_fraction, filter_text)
  make_out_dir(out_dir)
  outcomes, cache = read_pieces(pieces, out_dir / CACHE_DIR, sustain=sustain, workers=workers, progress=progress)
  skipped = [{"path": str(p.path), "reason": o} for p, o in outcomes.items() if isinstance(o, str)]
  kept = collections.defaultdict(list)
  for piece, outcome in outcomes.items():
    if not isinstance(outcome, str):
      kept[piece.split].append((piece, outcome))
  if not kept:
    example = skipped[0]
    raise UserError(f"none of the {len(pieces)} MIDI files has readable notes (e.g. {example['path']}: "
                    f"{example['reason']}): give MIDI files with notes")
  (out_dir / MANIFEST).unlink(missing_ok=True)
  manifest = {
      "format_version": store.FORMAT_VERSION,
      "source": list(sources),
      "options": {"sustain": sustain, "val_fraction": val_fraction, "filter": filter_text},
      "splits": write_store(out_dir, kept),
      "skipped": skipped,
      "cache": cache,
  }
  write_manifest(out_dir, manifest)
  if skipped:
    print(summary(skipped, len(pieces), out_dir / MANIFEST), file=sys.stderr)
  return manifest

