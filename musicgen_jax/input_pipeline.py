"""Training and evaluation batches from the prepared event store, with grain.

Training: one grain element is one whole batch, built vectorised with numpy from its step
index and the config seed. Batches therefore depend only on (seed, step, shard), not on the
worker count, and a restored iterator resumes with exactly the next batch. Workers receive
only the store's path and memory-map it themselves, so the corpus is never copied.

Evaluation: a fixed list of unaugmented windows evenly spaced over a split, identical on
every call, padded to whole batches with a `mask`.

Batch layout (B windows of T = `data.window` events; targets are inputs shifted by one):
  {"inputs": {"pitch": int32[B, T], "dt": float32[B, T], "velocity": float32[B, T]},
   "targets": {same three}, "held": float32[B, 128]}, plus "mask": float32[B] in evaluation batches.
"held" says, at the event before a window's first, for how many seconds each pitch has sounded since its
onset (held by a key or the pedal), and -1 for a silent pitch: a window cut from the middle of a piece
does not start in silence.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from musicgen_jax import store as store_lib
from musicgen_jax.errors import UserError

TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
MAX_PITCH = 127
MAX_VELOCITY = 127
THREADS_PER_PROCESS = 1  # Batches are vectorised numpy: one thread overlaps with the consumer.

BATCH_DTYPES = {"pitch": np.int32, "dt": np.float32, "velocity": np.float32}

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Run-time augmentation amounts; 0 turns each one off."""

  transpose: int = 0  # Semitones, drawn in [-transpose, +transpose].
  time_stretch: float = 0.0  # Factor on dt drawn in [1 - s, 1 + s].
  loudness_stretch: float = 0.0  # Factor on onset velocities drawn in [1 - s, 1 + s].

  @classmethod
  def from_config(cls, data: ml_collections.ConfigDict) -> Augmentation:
    return cls(int(data.transpose), float(data.time_stretch), float(data.loudness_stretch))


def open_store(data_dir: str | os.PathLike, split: str) -> store_lib.EventStore:
  """Opens a prepared split memory-mapped, or says how to create it."""
  if not store_lib.has_split(data_dir, split):
    raise UserError(f"no prepared '{split}' split in {data_dir or '(data.dir unset)'}: "
                    "run `musicgen prepare SOURCE --out DIR` first")
  return store_lib.open_split(data_dir, split)


def valid_starts(offsets: np.ndarray, window: int) -> np.ndarray:
  """Per piece, how many windows of `window + 1` events it holds (0 if too short); raises if none."""
  lengths = np.diff(offsets)
  valid = np.maximum(lengths - window, 0)
  if not valid.any():
    raise UserError(f"no piece has the {window + 1} events a window needs "
                    f"(longest: {lengths.max(initial=0)}): lower data.window")
  return valid


def piece_weights(offsets: np.ndarray, window: int) -> np.ndarray:
  """Cumulative integer draw weights: each piece's length, 0 if it holds no window."""
  return np.cumsum(np.where(valid_starts(offsets, window) > 0, np.diff(offsets), 0))


def sample_starts(rng: np.random.Generator, offsets: np.ndarray, cumulative_weights: np.ndarray,
                  window: int, count: int) -> np.ndarray:
  """Global start indices of `count` windows of `window + 1` events.

  Pieces are drawn with probability proportional to their weight, then a start uniformly
  among the piece's `length - window` valid positions.
  """
  pieces = np.searchsorted(cumulative_weights, rng.integers(0, cumulative_weights[-1], count),
                           side="right")
  valid = offsets[pieces + 1] - offsets[pieces] - window
  return offsets[pieces] + rng.integers(0, valid)


def evenly_spaced_starts(offsets: np.ndarray, window: int, count: int) -> np.ndarray:
  """Global starts of `count` windows evenly spaced over every valid position of the split."""
  valid = valid_starts(offsets, window)
  cumulative = np.cumsum(valid)
  positions = np.arange(count, dtype=np.int64) * cumulative[-1] // count
  pieces = np.searchsorted(cumulative, positions, side="right")
  return offsets[pieces] + positions - (cumulative[pieces] - valid[pieces])


SILENT = -1.0  # The `held` value of a pitch that does not sound.


@dataclasses.dataclass(frozen=True)
class EventIndex:
  """Where each pitch's events are in a split, pitch p's positions in order being
  `positions[bounds[p]:bounds[p + 1]]`, and the time of every event since its piece began (`clock`, seconds;
  float32 is fine within a piece): it finds which pitches sound at any position, and since when, without a
  scan."""

  positions: np.ndarray
  bounds: np.ndarray
  clock: np.ndarray

  @classmethod
  def of(cls, events: store_lib.Events, offsets: np.ndarray) -> EventIndex:
    pitch = np.asarray(events.pitch)
    positions = np.argsort(pitch, kind="stable").astype(np.int32 if len(pitch) < 2**31 else np.int64)
    clock = np.cumsum(np.asarray(events.dt), dtype=np.float64)
    piece_start_time = np.concatenate([[0.0], clock])[np.repeat(offsets[:-1], np.diff(offsets))]
    return cls(positions, np.searchsorted(pitch[positions], np.arange(MAX_PITCH + 2)),
               (clock - piece_start_time).astype(np.float32))


def held_before(events: store_lib.Events, offsets: np.ndarray, index: EventIndex, starts: np.ndarray) -> np.ndarray:
  """For each global start, the seconds [len(starts), 128] each pitch has sounded at the event before it
  (SILENT where it does not sound): a pitch sounds if its latest event earlier in the same piece is an onset."""
  piece_starts = offsets[np.searchsorted(offsets, starts, side="right") - 1]
  velocity = np.asarray(events.velocity)
  held = np.full((len(starts), MAX_PITCH + 1), SILENT, np.float32)
  for pitch in range(MAX_PITCH + 1):
    positions = index.positions[index.bounds[pitch]:index.bounds[pitch + 1]]
    if len(positions):
      latest = positions[np.maximum(np.searchsorted(positions, starts) - 1, 0)]
      sounding = (latest < starts) & (latest >= piece_starts) & (velocity[latest] > 0)
      held[sounding, pitch] = index.clock[starts[sounding] - 1] - index.clock[latest[sounding]]
  return held


def gather_windows(events: store_lib.Events, offsets: np.ndarray, index: EventIndex, starts: np.ndarray,
                   length: int) -> dict[str, np.ndarray]:
  """Copies the `length` events from each start into [len(starts), length] arrays per field, with what is
  held before each start (`held`)."""
  windows = {field: np.lib.stride_tricks.sliding_window_view(
      np.asarray(getattr(events, field)), length)[starts] for field in store_lib.FIELDS}
  return {**windows, "held": held_before(events, offsets, index, starts)}


def transpose(pitch: np.ndarray, held: np.ndarray, rng: np.random.Generator,
              max_shift: int) -> tuple[np.ndarray, np.ndarray]:
  """Shifts each window, and what is held before it, by a whole number of semitones in ±max_shift that
  keeps the window's events in 0-127.

  The shift is uniform among the allowed ones; 0 is always allowed. A pitch held before the window that
  the shift takes out of 0-127 is dropped: no event of the window names it.
  """
  pitch = pitch.astype(np.int32)
  if not max_shift:
    return pitch, held
  low = np.maximum(-max_shift, -pitch.min(axis=1))
  high = np.minimum(max_shift, MAX_PITCH - pitch.max(axis=1))
  shift = rng.integers(low, high, endpoint=True)[:, None]
  source = np.arange(MAX_PITCH + 1) - shift
  inside = (source >= 0) & (source <= MAX_PITCH)
  return pitch + shift, np.where(inside, np.take_along_axis(held, np.clip(source, 0, MAX_PITCH), axis=1), SILENT)


def stretch_factors(rng: np.random.Generator, amount: float, count: int) -> np.ndarray:
  """One factor per window, uniform in [1 - amount, 1 + amount], shaped [count, 1]."""
  return rng.uniform(1.0 - amount, 1.0 + amount, (count, 1)).astype(np.float32)


def stretch_time(dt: np.ndarray, held: np.ndarray, rng: np.random.Generator,
                 amount: float) -> tuple[np.ndarray, np.ndarray]:
  """Scales every dt of a window, and how long its held pitches have sounded, by one factor: the same
  music played faster or slower."""
  dt = dt.astype(np.float32)
  if not amount:
    return dt, held
  factors = stretch_factors(rng, amount, len(dt))
  return dt * factors, np.where(held >= 0, held * factors, SILENT)


def stretch_loudness(velocity: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
  """Scales onset velocities of a window by one factor, kept in 1-127; releases stay 0."""
  velocity = velocity.astype(np.float32)
  if not amount:
    return velocity
  scaled = np.clip(np.rint(velocity * stretch_factors(rng, amount, len(velocity))), 1, MAX_VELOCITY)
  return np.where(velocity > 0, scaled, np.float32(0))


def augment(windows: dict[str, np.ndarray], rng: np.random.Generator,
            augmentation: Augmentation) -> dict[str, np.ndarray]:
  """Applies the three augmentations, each with its own factor per window."""
  pitch, held = transpose(windows["pitch"], windows["held"], rng, augmentation.transpose)
  dt, held = stretch_time(windows["dt"], held, rng, augmentation.time_stretch)
  return {"pitch": pitch, "dt": dt, "held": held,
          "velocity": stretch_loudness(windows["velocity"], rng, augmentation.loudness_stretch)}


def to_batch(windows: dict[str, np.ndarray]) -> Batch:
  """Splits [B, T + 1] windows into model inputs (first T events) and targets (last T), beside what is
  held before the inputs.

  The halves are contiguous copies: grain hands only contiguous arrays between processes through
  shared memory (others are pickled through a pipe, which is slower and can stall `close()`).
  """
  events = {k: windows[k].astype(dtype, copy=False) for k, dtype in BATCH_DTYPES.items()}
  return {"inputs": {k: np.ascontiguousarray(v[:, :-1]) for k, v in events.items()},
          "targets": {k: np.ascontiguousarray(v[:, 1:]) for k, v in events.items()},
          "held": np.ascontiguousarray(windows["held"], dtype=np.float32)}


@dataclasses.dataclass
class TrainBatch(grain.transforms.Map):
  """Maps a step index to that step's augmented batch for one shard.

  Holds only the path and the small offsets array; the events are memory-mapped on first use
  in whichever process runs it, and never pickled.
  """

  data_dir: str
  split: str
  offsets: np.ndarray
  cumulative_weights: np.ndarray
  seed: int
  batch_size: int
  window: int
  augmentation: Augmentation
  shard_index: int = 0
  shard_count: int = 1

  @functools.cached_property
  def events(self) -> store_lib.Events:
    return open_store(self.data_dir, self.split).events

  @functools.cached_property
  def index(self) -> EventIndex:
    return EventIndex.of(self.events, self.offsets)

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k not in ("events", "index")}

  def map(self, step: int) -> Batch:
    rng = np.random.default_rng([self.seed, step * self.shard_count + self.shard_index])
    starts = sample_starts(rng, self.offsets, self.cumulative_weights, self.window, self.batch_size)
    windows = gather_windows(self.events, self.offsets, self.index, starts, self.window + 1)
    return to_batch(augment(windows, rng, self.augmentation))


def shard_batch_size(global_batch_size: int, shard_count: int) -> int:
  """The per-shard batch size; the global one must split evenly."""
  if global_batch_size % shard_count:
    raise UserError(f"train.batch_size {global_batch_size} does not split evenly over "
                    f"{shard_count} processes")
  return global_batch_size // shard_count


def ensure_flags_parsed() -> None:
  """Lets grain's multiprocessing read its absl flags when not running under absl.app.run."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(config: ml_collections.ConfigDict, data_dir: str | os.PathLike, *,
                  shard_index: int = 0, shard_count: int = 1,
                  split: str = TRAIN_SPLIT) -> grain.IterDataset:
  """The endless, augmented training batches of one shard (jax process), prefetched.

  Shard k reads batch indices k, k + n, k + 2n, ... of the seed's stream, so shards are
  disjoint; each yields train.batch_size / n windows per batch.
  """
  offsets = np.asarray(open_store(data_dir, split).offsets)
  transform = TrainBatch(
      data_dir=os.fspath(data_dir), split=split, offsets=offsets,
      cumulative_weights=piece_weights(offsets, config.data.window), seed=config.seed,
      batch_size=shard_batch_size(config.train.batch_size, shard_count),
      window=config.data.window, augmentation=Augmentation.from_config(config.data),
      shard_index=shard_index, shard_count=shard_count)
  dataset = grain.MapDataset.range(sys.maxsize).map(transform).to_iter_dataset(
      grain.ReadOptions(num_threads=THREADS_PER_PROCESS, prefetch_buffer_size=config.data.prefetch))
  if config.data.workers <= 0:
    return dataset
  ensure_flags_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=config.data.workers, per_worker_buffer_size=config.data.prefetch))


def train_iterator(config: ml_collections.ConfigDict, data_dir: str | os.PathLike, *,
                   shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
  """An iterator over `train_dataset`; checkpoint it with get_state/set_state or
  grain.checkpoint.CheckpointSave/CheckpointRestore, and `close()` it when done (it may own
  worker processes).
  """
  return iter(train_dataset(config, data_dir, shard_index=shard_index, shard_count=shard_count))


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Appends zero rows so that the first axis has `rows` entries."""
  return np.concatenate([array, np.zeros((rows - len(array), *array.shape[1:]), array.dtype)])


def eval_batches(config: ml_collections.ConfigDict, data_dir: str | os.PathLike,
                 split: str = EVAL_SPLIT, batch_size: int | None = None) -> list[Batch]:
  """The fixed evaluation stream of a split: `data.eval_windows` unaugmented windows, evenly
  spaced, in batches of `batch_size` (default train.batch_size) with the last one zero-padded
  and a float32 `mask` (1 real, 0 padding) so averaged metrics stay exact.
  """
  batch_size = batch_size or config.train.batch_size
  event_store = open_store(data_dir, split)
  count = config.data.eval_windows
  offsets = np.asarray(event_store.offsets)
  starts = evenly_spaced_starts(offsets, config.data.window, count)
  windows = gather_windows(event_store.events, offsets, EventIndex.of(event_store.events, offsets), starts,
                           config.data.window + 1)
  rows = -(-count // batch_size) * batch_size
  padded = {k: pad_rows(v, rows) for k, v in windows.items()}
  mask = pad_rows(np.ones(count, np.float32), rows)
  return [{**to_batch({k: v[i:i + batch_size] for k, v in padded.items()}),
           "mask": mask[i:i + batch_size]} for i in range(0, rows, batch_size)]
