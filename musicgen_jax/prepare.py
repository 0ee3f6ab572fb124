"""`musicgen prepare`: MIDI sources -> the event store of each split, parsed in parallel with a per-file cache.

A SOURCE is a MAESTRO root (its CSV gives each piece's split), a folder searched recursively for MIDI
files, or a single file; outside MAESTRO a stable hash of the path within its source picks the
validation pieces. `DIR/manifest.json`, written last, marks the store complete; every other file is
written under a temporary name and renamed into place, so a run killed at any moment leaves no
half-written file, and a rerun (which removes such leftovers) reuses what it had cached.

Each file is read in a worker process that holds one piece at a time and is killed if it takes
longer than `file_timeout`: no file can crash or hang the preparation, it is skipped with a reason.
Running two preparations into the same folder at once is not supported.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import hashlib
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import warnings
from multiprocessing import connection
from pathlib import Path
from typing import Any

import numpy as np

from musicgen_jax import atomic, events, store
from musicgen_jax.errors import UserError

# Standard MIDI files, karaoke MIDI files (lyrics as text events) and RIFF-wrapped RMID files.
MIDI_SUFFIXES = (".mid", ".midi", ".smf", ".kar", ".rmi")
SPLITS = ("train", "validation", "test")
MANIFEST = store.MANIFEST
CACHE_DIR = ".cache"
CACHE_VERSION = 2  # bump when the events read from a file change
FILE_TIMEOUT = 60.0  # seconds a worker may spend on one file before it is killed and the file skipped
ORPHAN_GRACE = 5.0  # a worker whose parent died ends itself this long after its file's timeout
# The fork server imports these once, so that each worker starts in milliseconds with the readers loaded.
PRELOAD = ("musicgen_jax.prepare", "note_seq", "pretty_midi")
# What a run killed part-way leaves behind: `.NAME.tmp-PID` files and folders, `.SPLIT.old-PID` folders.
LEFTOVER = re.compile(r"\..+\.(tmp|old)-\d+")
Job = tuple[Path, bool, Path]  # a MIDI file, whether to apply the sustain pedal, its cache file

# note-seq imports pydub, which warns that ffmpeg is missing: irrelevant to MIDI. The fork server imports this
# module before note-seq (see PRELOAD), so the filter quiets the workers too.
warnings.filterwarnings("ignore", message="Couldn't find ffmpeg", category=RuntimeWarning)


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


def midi_files(folder: Path) -> list[Path]:
  """Every path under `folder` with a MIDI suffix (any case), sorted."""
  return sorted(p for p in folder.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES)


def folder_pieces(folder: Path, val_fraction: float) -> list[Piece]:
  """Every MIDI path under `folder` (`midi_files`), split by the hash of its path within `folder`."""
  paths = midi_files(folder)
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
  """Saves events, or the reason a file is unusable, atomically (a temporary file renamed into place)."""
  arrays = {"reason": np.array(outcome)} if isinstance(outcome, str) else {f: getattr(outcome, f) for f in store.FIELDS}
  with atomic.replacing(file) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def cached_reason(file: Path) -> str | None:
  """The reason `write_cache` saved, None if it saved events (which stay on disk: only the zip index is read)."""
  with np.load(file, allow_pickle=False) as saved:
    return str(saved["reason"]) if "reason" in saved else None


def read_cache(file: Path) -> store.Events:
  """The events `write_cache` saved (plain arrays only: nothing is unpickled)."""
  with np.load(file, allow_pickle=False) as saved:
    return store.Events(*(saved[field] for field in store.FIELDS))


def parse_to_cache(path: Path, sustain: bool, file: Path) -> None:
  """Reads one MIDI file and caches its events, or why it can't be used (unreadable, or no notes)."""
  try:
    outcome = events.midi_to_events(path, sustain=sustain)
  except events.MidiReadError as error:
    outcome = str(error)
  write_cache(file, outcome if isinstance(outcome, str) or len(outcome) else "no notes")


def run_job(job: Job) -> str | None:
  """Runs one job; None, or the reason it failed unexpectedly (a bug on a strange file costs that file only)."""
  try:
    parse_to_cache(*job)
  except Exception as error:  # reported per file in the manifest, and tried again by the next run
    return f"reader failed ({type(error).__name__}: {str(error)[:100]})"
  return None


def serve(conn: connection.Connection, file_timeout: float) -> None:
  """A worker process: runs the jobs it is sent one at a time, answering each (and first its start) with
  `run_job`'s result, until the pipe closes.

  Should the parent die while a file hangs, nobody would kill this process: an alarm ends it instead.
  Ctrl+C is the parent's to handle (it kills its workers).
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  answer = None
  while True:
    try:
      conn.send(answer)
      job = conn.recv()
    except (EOFError, OSError):
      return
    signal.setitimer(signal.ITIMER_REAL, file_timeout + ORPHAN_GRACE)  # the default action ends the process
    answer = run_job(job)
    signal.setitimer(signal.ITIMER_REAL, 0)


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
  """Workers fork from a fork server with the readers preloaded (cheap to replace), else are spawned.

  Never forked from this process itself: its JAX threads would make that unsafe.
  """
  if "forkserver" not in multiprocessing.get_all_start_methods():
    return multiprocessing.get_context("spawn")
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(list(PRELOAD))
  return context


@dataclasses.dataclass
class Worker:
  """A worker process, the parent's end of its pipe, and the job it is on (None while starting or idle)."""

  process: multiprocessing.process.BaseProcess
  conn: connection.Connection
  job: Job | None = None
  deadline: float = math.inf


def start_worker(file_timeout: float) -> Worker:
  context = worker_context()
  conn, child_conn = context.Pipe()
  process = context.Process(target=serve, args=(child_conn, file_timeout), daemon=True, name="musicgen-reader")
  process.start()
  child_conn.close()
  return Worker(process, conn)


def stop_worker(worker: Worker) -> None:
  worker.process.kill()
  worker.process.join()
  worker.conn.close()


def give_job(worker: Worker, job: Job, file_timeout: float) -> None:
  """Sends a job and starts its clock (a worker that died meanwhile shows up as a closed pipe)."""
  worker.job, worker.deadline = job, time.monotonic() + file_timeout
  try:
    worker.conn.send(job)
  except OSError:
    pass


def death_reason(process: multiprocessing.process.BaseProcess) -> str:
  """Why a worker process ended, in a few words."""
  process.join()
  code = process.exitcode
  return f"reader process killed by {signal.Signals(-code).name}" if code < 0 else f"reader process exited ({code})"


def worker_news(worker: Worker, readable: bool) -> tuple[bool, str | None] | None:
  """None while a worker is busy within its time; else whether it is still alive, and its job's failure reason."""
  if readable:
    try:
      return True, worker.conn.recv()
    except EOFError:
      if worker.job is None:
        raise RuntimeError(f"a MIDI reader process failed to start ({death_reason(worker.process)})") from None
      return False, death_reason(worker.process)
  if time.monotonic() >= worker.deadline:
    return False, "timed out"
  return None


def parse_all(jobs: list[Job], workers: int, progress: bool, file_timeout: float) -> dict[Path, str]:
  """Runs every job in up to `workers` worker processes, each killed and replaced if a file takes longer
  than `file_timeout` seconds or kills it; returns the reasons of the files that failed so (not cached,
  so a rerun tries them again).
  """
  from tqdm import tqdm

  pending = collections.deque(jobs)
  failures: dict[Path, str] = {}
  pool: list[Worker] = []
  with tqdm(total=len(jobs), desc="reading MIDI", unit="file", disable=not progress or not jobs) as bar:
    try:
      pool = [start_worker(file_timeout) for _ in range(min(workers, len(jobs)))]
      while pool:
        deadline = min(worker.deadline for worker in pool)
        wait = None if deadline == math.inf else max(deadline - time.monotonic(), 0.0)
        ready = connection.wait([worker.conn for worker in pool], timeout=wait)
        for worker in list(pool):
          news = worker_news(worker, worker.conn in ready)
          if news is None:
            continue
          alive, reason = news
          if worker.job is not None:
            if reason is not None:
              failures[worker.job[0]] = reason
            bar.update()
          if alive and pending:
            give_job(worker, pending.popleft(), file_timeout)
            continue
          pool.remove(worker)
          stop_worker(worker)
          if pending:
            pool.append(start_worker(file_timeout))
    finally:
      for worker in pool:
        stop_worker(worker)
  return failures


def read_pieces(pieces: list[Piece], cache_dir: Path, *, sustain: bool, workers: int, progress: bool,
                file_timeout: float) -> tuple[dict[Piece, Path | str], dict[str, int]]:
  """The cache file holding each piece's events, or why the piece can't be used; and how many files came
  from the cache or were parsed.
  """
  files = {p: cache_file(cache_dir, p.path, sustain) for p in pieces if p.path.exists()}
  jobs = [(p.path, sustain, file) for p, file in files.items() if not file.exists()]
  failures = parse_all(jobs, workers, progress, file_timeout)

  def outcome(piece: Piece) -> Path | str:
    if piece not in files:
      return "file not found"
    return failures.get(piece.path) or cached_reason(files[piece]) or files[piece]

  return {p: outcome(p) for p in pieces}, {"hits": len(files) - len(jobs), "parsed": len(jobs)}


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


def remove_leftovers(out_dir: Path) -> None:
  """Deletes the temporary files and folders a run killed part-way left in `out_dir` and its cache."""
  for path in [*out_dir.iterdir(), *(out_dir / CACHE_DIR).iterdir()]:
    if LEFTOVER.fullmatch(path.name):
      if path.is_dir():
        shutil.rmtree(path)
      else:
        path.unlink()


def split_order(split: str) -> tuple[int, str]:
  return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def write_store(out_dir: Path, kept: dict[str, list[tuple[Piece, Path]]]) -> dict[str, Any]:
  """Writes each split from the cache files of its pieces, one split in memory at a time (removing splits of
  an earlier run that this one doesn't have); the manifest's splits.
  """
  for stale in set(SPLITS) - kept.keys():
    shutil.rmtree(store.split_dir(out_dir, stale), ignore_errors=True)
  splits = {}
  for split in sorted(kept, key=split_order):
    pieces = [read_cache(file) for _, file in kept[split]]
    store.write_split(out_dir, split, pieces)
    splits[split] = {"files": len(pieces), "events": sum(len(e) for e in pieces),
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
                   progress: bool = True, file_timeout: float = FILE_TIMEOUT) -> dict[str, Any]:
  """Prepares the event store of MIDI `sources` in `out_dir` and returns its manifest (also `out_dir/manifest.json`).

  Unreadable or empty files, and files that take over `file_timeout` seconds to read, are skipped and
  listed; a UserError if there is nothing usable at all.
  """
  if workers < 1:
    raise UserError(f"--workers must be at least 1, not {workers}")
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"--val-fraction must be in [0, 1), not {val_fraction}")
  if not file_timeout > 0:
    raise UserError(f"--file-timeout must be a positive number of seconds, not {file_timeout}")
  out_dir = Path(out_dir)
  pieces = select_pieces(sources, val_fraction, filter_text)
  make_out_dir(out_dir)
  remove_leftovers(out_dir)
  outcomes, cache = read_pieces(pieces, out_dir / CACHE_DIR, sustain=sustain, workers=workers, progress=progress,
                                file_timeout=file_timeout)
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
  store.write_manifest(out_dir, manifest)
  if skipped:
    print(summary(skipped, len(pieces), out_dir / MANIFEST), file=sys.stderr)
  return manifest

