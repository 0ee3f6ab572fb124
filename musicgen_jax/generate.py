"""`musicgen generate`: the file work around the sampler. Checks the options, reads a primer, loads the
run, samples batch after batch with `sampling` and writes each file atomically as its batch is done.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from musicgen_jax import atomic, checkpointing, events, models, paths, sampling, store
from musicgen_jax.errors import UserError

MAX_SEED = 2**63
DEFAULT_PRIMER_EVENTS = 2048  # A primer's events used when the caller names no count: enough to set the state.
DEFAULT_LENGTH = 1024  # Events per file when neither a length nor seconds are given.
SECONDS_CHUNK = 512  # Events sampled per compiled call when files are measured in seconds.
MAX_EVENTS_PER_SECOND = 200  # With --seconds, a sequence stops after this many events per second of music anyway.
T = TypeVar("T")


def take(events: store.Events, count: int | None) -> store.Events:
  """The first `count` events (all with None)."""
  return store.Events(*(getattr(events, f)[:count] for f in store.FIELDS))


def check_options(*, num: int, length: int | None, seconds: float | None, batch_size: int,
                  temperature: float | None, time_temperature: float | None, velocity_temperature: float | None,
                  top_k: int | None, top_p: float | None, seed: int, primer: str | os.PathLike | None,
                  primer_events: int | None, keep_primer: bool, prefix: str,
                  notes_per_second: float | None = None, polyphony: float | None = None) -> None:
  """Raises a UserError naming the first option out of range (a sampling option of None is the run's own)."""
  if length is not None and seconds is not None:
    raise UserError("give the length of the files in events (--length) or in seconds (--seconds), not both")
  for name, value in (("num", num), ("length", 1 if length is None else length), ("batch size", batch_size)):
    if value < 1:
      raise UserError(f"the {name} must be at least 1, not {value}")
  for option, value in (("--seconds", seconds), ("--notes-per-second", notes_per_second), ("--polyphony", polyphony)):
    if value is not None and not 0.0 < value < float("inf"):
      raise UserError(f"{option} must be a positive number, not {value}")
  for name, value in (("temperature", temperature), ("time temperature", time_temperature),
                      ("velocity temperature", velocity_temperature)):
    if value is not None and not 0.0 < value < float("inf"):
      raise UserError(f"the {name} must be a positive number, not {value}")
  if top_k is not None and top_k < 0:
    raise UserError(f"top-k must be 0 (off) or a positive number of pitches, not {top_k}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise UserError(f"top-p must be in (0, 1] (1: off), not {top_p}")
  if not -MAX_SEED <= seed < MAX_SEED:
    raise UserError(f"the seed must be between -2**63 and 2**63 - 1, not {seed}")
  if primer_events is not None and primer is None:
    raise UserError("--primer-events needs a primer: pass --primer FILE.mid")
  if keep_primer and primer is None:
    raise UserError("--keep-primer needs a primer: pass --primer FILE.mid")
  if primer_events is not None and primer_events < 1:
    raise UserError(f"--primer-events must be at least 1, not {primer_events}")
  if not prefix or any(sep and sep in prefix for sep in ("/", "\\", os.sep, os.altsep, "\0")):
    raise UserError(f"the file name prefix {prefix!r} must be a non-empty name without path separators")


def read_primer(path: str | os.PathLike, count: int | None, sustain: bool) -> store.Events:
  """The first `count` events (default DEFAULT_PRIMER_EVENTS) of a primer MIDI file; a UserError if it
  can't be read or has no notes.
  """
  try:
    primer = events.midi_to_events(path, sustain=sustain)
  except events.MidiReadError as error:
    raise UserError(f"cannot read primer {path}: {error}") from None
  if not len(primer):
    raise UserError(f"primer {path} has no notes")
  return take(primer, DEFAULT_PRIMER_EVENTS if count is None else count)


def output_paths(out_dir: Path, prefix: str, num: int) -> list[Path]:
  """`out_dir/<prefix>_<i>.mid` for i < num, zero-padded so that the names sort in order."""
  width = len(str(num - 1))
  return [out_dir / f"{prefix}_{i:0{width}d}.mid" for i in range(num)]


def check_free(paths: list[Path], overwrite: bool) -> None:
  """A UserError if any of `paths` exists and `overwrite` is off: earlier files are never replaced silently."""
  existing = [path for path in paths if path.exists()]
  if existing and not overwrite:
    more = f" (and {len(existing) - 1} more of the {len(paths)} files)" if len(existing) > 1 else ""
    raise UserError(f"{existing[0]} already exists{more}: choose another --out or --prefix, or pass --overwrite "
                    "to replace them")


def within_seconds(stream: store.Events, seconds: float | None) -> store.Events:
  """The events of `stream` up to `seconds` of music (all with None)."""
  if seconds is None:
    return stream
  return take(stream, int(np.searchsorted(np.cumsum(stream.dt, dtype=np.float64), seconds, side="right")))


def sample_batch(graphdef: Any, params: Any, state: Any, event: Any, keys: jax.Array, settings: sampling.Settings,
                 held: Any, length: int | None, seconds: float | None, controls: Any = None) -> Any:
  """The events [B, T] of one batch: `length` of them, or, with `seconds`, chunks of SECONDS_CHUNK events until
  every sequence holds that much music (or MAX_EVENTS_PER_SECOND per second of it); `controls` as
  `sampling.sample` takes them."""
  if seconds is None:
    return sampling.sample_compiled(graphdef, params, state, event, keys, settings, length, held, 0, controls)[0]
  chunks, carry, music = [], (state, event, held), np.zeros(keys.shape[0])
  max_chunks = math.ceil(MAX_EVENTS_PER_SECOND * seconds / SECONDS_CHUNK)
  while music.min() < seconds and len(chunks) < max_chunks:
    chunk, carry = sampling.sample_compiled(graphdef, params, *carry[:2], keys, settings, SECONDS_CHUNK, carry[2],
                                            len(chunks) * SECONDS_CHUNK, controls)
    chunks.append(jax.device_get(chunk))
    music += chunks[-1]["dt"].sum(axis=1, dtype=np.float64)
  return {field: np.concatenate([chunk[field] for chunk in chunks], axis=1) for field in chunks[0]}


def make_out_dir(out_dir: str | os.PathLike) -> Path:
  """Creates the output folder if needed; a UserError if it can't be or can't be written in."""
  out_dir = Path(out_dir)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"cannot create output folder {out_dir} ({error.strerror or error})") from None
  paths.check_writable(out_dir, "output folder")
  return out_dir


def one_ahead(items: Iterator[T]) -> Iterator[T]:
  """Yields each item after starting the next, so that JAX's asynchronous dispatch overlaps both."""
  previous = next(items, None)
  for item in items:
    yield previous
    previous = item
  if previous is not None:
    yield previous


def write_midi(stream: store.Events, path: Path) -> None:
  """Writes a MIDI file under a temporary name, renamed into place: a kill never leaves half a file."""
  try:
    with atomic.replacing(path) as tmp:
      events.write_midi(stream, tmp)
  except OSError as error:
    raise UserError(f"could not write {path} ({error.strerror or error}): free space or choose another "
                    "output folder") from None


def generate(workdir: str | os.PathLike, out_dir: str | os.PathLike, *, num: int = 1, length: int | None = None,
             seconds: float | None = None, batch_size: int = 16, temperature: float | None = None,
             time_temperature: float | None = None, velocity_temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             primer: str | os.PathLike | None = None, primer_events: int | None = None, keep_primer: bool = False,
             notes_per_second: float | None = None, polyphony: float | None = None,
             checkpoint: str | int = "latest", prefix: str = "sample",
             overwrite: bool = False, progress: bool = True) -> list[Path]:
  """Writes `num` MIDI files from a run's checkpoint, each `length` generated events (default
  DEFAULT_LENGTH) or `seconds` of generated music long; returns their paths.

  Files are sampled `batch_size` at a time (the last batch padded, so one compile serves all) and
  written as each batch is done. With `primer`, its first `primer_events` events (default
  DEFAULT_PRIMER_EVENTS) warm the model up and, with `keep_primer`, open every file. Existing files are
  replaced only with `overwrite`. The sampling options left None are the run's `sample.*` settings. A
  conditioned run plays every file at `notes_per_second` and holds `polyphony` notes at once on average (for
  the controls it reads), or else at its primer's, or else at values drawn for each file from the training
  pieces', stratified over the `num` files (`sampling.sequence_controls`).
  Every user mistake is a UserError.
  """
  from tqdm import tqdm

  check_options(num=num, length=length, seconds=seconds, batch_size=batch_size, temperature=temperature,
                time_temperature=time_temperature, velocity_temperature=velocity_temperature, top_k=top_k,
                top_p=top_p, seed=seed, primer=primer, primer_events=primer_events, keep_primer=keep_primer,
                prefix=prefix, notes_per_second=notes_per_second, polyphony=polyphony)
  if length is None and seconds is None:
    length = DEFAULT_LENGTH
  paths.check_writable(out_dir, "output folder")
  run = checkpointing.load_run(workdir, checkpoint)
  given = {"density": notes_per_second, "polyphony": polyphony}
  controls = models.controls_of(run.config.model)
  for name, value in given.items():
    if value is not None and name not in controls:
      raise UserError(f"the run at {workdir} does not read the {name} control (model.condition="
                      f"{run.config.model.get('condition', 'none')}): drop {sampling.CONTROL_OPTIONS[name]}, or "
                      f"train with a model.condition that reads {name}")
  primer_stream = None if primer is None else read_primer(primer, primer_events, run.config.data.sustain)
  files = output_paths(make_out_dir(out_dir), prefix, num)
  check_free(files, overwrite)
  settings = sampling.make_settings(run.config, temperature=temperature, top_k=top_k, top_p=top_p,
                                    time_temperature=time_temperature, velocity_temperature=velocity_temperature)
  primer_inputs = None if primer_stream is None else sampling.as_inputs(primer_stream)
  batch = min(batch_size, num)
  replicated, sharded = sampling.device_placement(batch)
  params = jax.device_put(run.params, replicated)
  primed = None
  if controls and primer_inputs is not None:
    primed = {name: (jnp.full((1,), sampling.control_value(name, given[name])) if given[name] is not None
                     else value) for name, value in sampling.primer_controls(controls, primer_inputs).items()}
  state, event = jax.device_put(sampling.prime_compiled(run.graphdef, params, primer_inputs, primed), replicated)
  held = (None if primer_inputs is None
          else jax.device_put(jax.jit(sampling.held_after)(primer_inputs), replicated))

  def batch_of(first: int) -> Any:
    keys = jax.device_put(sampling.sequence_keys(seed, first, batch), sharded)
    file_controls = primed if primed is not None else jax.device_put(
        sampling.sequence_controls(run.config, seed, first, batch, num, given), sharded)
    return sample_batch(run.graphdef, params, state, event, keys, settings, held, length, seconds, file_controls)

  batches = one_ahead((first, batch_of(first)) for first in range(0, num, batch))
  with tqdm(total=num, unit="file", desc="generating", disable=not progress, dynamic_ncols=True) as bar:
    for first, sampled in batches:
      sampled = jax.device_get(sampled)
      for row, path in enumerate(files[first:first + batch]):
        continuation = within_seconds(sampling.to_events(sampled, row), seconds)
        write_midi(store.Events.concatenate([primer_stream, continuation]) if keep_primer else continuation,
                   path)
        bar.update(1)
  return files
