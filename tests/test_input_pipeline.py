"""The grain input pipeline on small synthetic stores: layout, augmentation, sampling, resumption."""

import pickle

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from musicgen_jax import input_pipeline, store
from musicgen_jax.errors import UserError

WINDOW = 8
BATCH = 4


def make_config(**data):
  """The tiny config with a small window and batch, in-process, plus `data` overrides."""
  config = tiny.get_config()
  config.data.window = WINDOW
  config.data.workers = 0
  config.data.prefetch = 2
  config.data.eval_windows = 10
  config.train.batch_size = BATCH
  for key, value in data.items():
    config.data[key] = value
  return config


def no_augmentation(**data):
  return make_config(transpose=0, time_stretch=0.0, loudness_stretch=0.0, **data)


def piece(length, pitch=None, seed=0):
  """A piece of `length` events: random pitch unless constant `pitch`, dt encoding the position."""
  rng = np.random.default_rng(seed)
  pitches = rng.integers(0, 128, length) if pitch is None else np.full(length, pitch)
  velocity = np.where(rng.random(length) < 0.4, 0, rng.integers(1, 128, length))
  return store.Events(pitches.astype(np.uint8), (np.arange(length) + 1).astype(np.float32) / 64,
                      velocity.astype(np.uint8))


@pytest.fixture
def data_dir(tmp_path):
  """A train split of pieces with random pitches and a short validation split."""
  store.write_corpus(tmp_path, {"train": [piece(n, seed=n) for n in (40, 100, 60, 3)],
                                "validation": [piece(n, seed=n) for n in (20, 5, 30)]})
  return tmp_path


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    for part in ("inputs", "targets"):
      for field in store.FIELDS:
        np.testing.assert_array_equal(x[part][field], y[part][field])


def test_batch_layout(data_dir):
  batch = next(input_pipeline.train_iterator(make_config(), data_dir))
  assert set(batch) == {"inputs", "targets", "held"}
  held = batch.pop("held")
  assert (held.shape, held.dtype, held.flags.c_contiguous) == ((BATCH, 128), np.float32, True)
  for part in batch.values():
    assert {k: (v.shape, v.dtype) for k, v in part.items()} == {
        "pitch": ((BATCH, WINDOW), np.int32), "dt": ((BATCH, WINDOW), np.float32),
        "velocity": ((BATCH, WINDOW), np.float32)}
    assert all(v.flags.c_contiguous for v in part.values())  # grain passes these via shared memory.


@pytest.mark.parametrize("augmented", [False, True])
def test_targets_are_inputs_shifted_by_one(data_dir, augmented):
  config = make_config() if augmented else no_augmentation()
  for batch in take(input_pipeline.train_iterator(config, data_dir), 5):
    for field in store.FIELDS:
      np.testing.assert_array_equal(batch["inputs"][field][:, 1:], batch["targets"][field][:, :-1])


def held_by_scan(events: store.Events, offsets: np.ndarray, start: int) -> np.ndarray:
  """What is held at the event before global position `start` (seconds since each sounding pitch's onset,
  -1 for a silent one), by replaying its piece from the beginning."""
  onset_time, now = np.full(128, np.nan), 0.0
  for i in range(offsets[np.searchsorted(offsets, start, side="right") - 1], start):
    now += float(events.dt[i])
    onset_time[events.pitch[i]] = now if events.velocity[i] > 0 else np.nan
  return np.where(np.isnan(onset_time), -1.0, now - onset_time)


def assert_held_equal(found: np.ndarray, expected: np.ndarray) -> None:
  np.testing.assert_array_equal(found >= 0, expected >= 0)
  np.testing.assert_allclose(found, expected, atol=1e-4)


def test_what_is_held_before_any_position_is_what_its_piece_holds(data_dir):
  """At every position of a split, piece boundaries included (a note left sounding at the end of a piece
  does not sound at the start of the next)."""
  split = store.open_split(data_dir, "train")
  offsets = np.asarray(split.offsets)
  starts = np.arange(len(split.events))
  found = input_pipeline.held_before(split.events, offsets, input_pipeline.EventIndex.of(split.events, offsets), starts)
  expected = np.stack([held_by_scan(split.events, offsets, start) for start in starts])
  assert_held_equal(found, expected)
  assert (expected >= 0).sum(axis=1).max() >= 5 and expected.max() > 0.5 and (expected[offsets[:-1]] == -1).all()


def test_evaluation_windows_carry_what_is_held_before_them(data_dir):
  config = no_augmentation()
  split = store.open_split(data_dir, "validation")
  offsets = np.asarray(split.offsets)
  starts = input_pipeline.evenly_spaced_starts(offsets, WINDOW, config.data.eval_windows)
  held = np.concatenate([b["held"] for b in input_pipeline.eval_batches(config, data_dir)])
  expected = np.stack([held_by_scan(split.events, offsets, start) for start in starts])
  assert_held_equal(held[:len(starts)], expected)
  assert (expected > 0).any()


def random_held(rng: np.random.Generator, rows: int) -> np.ndarray:
  return np.where(rng.random((rows, 128)) < 0.2, rng.exponential(1.0, (rows, 128)), -1.0).astype(np.float32)


def test_transposition_moves_the_held_pitches_with_the_window():
  rng = np.random.default_rng(0)
  pitch = rng.integers(10, 118, (300, WINDOW))
  held = random_held(rng, 300)
  shifted_pitch, shifted = input_pipeline.transpose(pitch, held, rng, 12)
  shifts = shifted_pitch[:, 0] - pitch[:, 0]
  assert set(shifts) == set(range(-12, 13))
  for row, shift in enumerate(shifts):
    np.testing.assert_array_equal(shifted_pitch[row], pitch[row] + shift)
    expected = np.full(128, -1.0, np.float32)
    kept = np.arange(128)[(np.arange(128) + shift >= 0) & (np.arange(128) + shift <= 127)]
    expected[kept + shift] = held[row, kept]
    np.testing.assert_array_equal(shifted[row], expected)


def constant_piece(length, pitch, tag):
  """A piece of one repeated pitch whose dt is `tag`, to tell pieces apart after transposition."""
  return store.Events(np.full(length, pitch, np.uint8), np.full(length, tag, np.float32),
                      np.full(length, 64, np.uint8))


def test_transposition_stays_in_range_and_draws_every_allowed_shift(tmp_path):
  pitches = np.array([0, 2, 60, 125, 127])
  store.write_corpus(tmp_path, {"train": [constant_piece(50, p, i) for i, p in enumerate(pitches)]})
  config = make_config(transpose=3, time_stretch=0.0, loudness_stretch=0.0)
  config.train.batch_size = 500
  batch = next(input_pipeline.train_iterator(config, tmp_path))
  pitch, tag = batch["inputs"]["pitch"], batch["inputs"]["dt"][:, 0].astype(int)
  assert pitch.min() >= 0 and pitch.max() <= 127
  assert (pitch == pitch[:, :1]).all()
  shifts = pitch[:, 0] - pitches[tag]
  for i, p in enumerate(pitches):
    assert set(shifts[tag == i]) == set(range(max(-3, -p), min(3, 127 - p) + 1))


def test_windows_spanning_the_whole_range_are_not_transposed(tmp_path):
  edges = store.Events(np.tile(np.array([0, 127], np.uint8), 20), np.ones(40, np.float32),
                       np.full(40, 64, np.uint8))
  store.write_corpus(tmp_path, {"train": [edges]})
  batch = next(input_pipeline.train_iterator(make_config(transpose=6), tmp_path))
  pitch = batch["inputs"]["pitch"]
  np.testing.assert_array_equal(pitch[:, 1:], 127 - pitch[:, :-1])
  assert set(np.unique(pitch)) == {0, 127}


def test_loudness_stretch_keeps_releases_and_bounds():
  velocity = np.array([[0, 1, 64, 127, 0, 100]] * 500, np.uint8)
  stretched = input_pipeline.stretch_loudness(velocity, np.random.default_rng(0), 0.5)
  assert stretched.dtype == np.float32
  np.testing.assert_array_equal(stretched == 0, velocity == 0)
  onsets = stretched[velocity > 0]
  assert onsets.min() == 1 and onsets.max() == 127 and (onsets == np.rint(onsets)).all()
  ratio = stretched[:, 2] / 64
  assert ratio.min() >= 0.5 - 1 / 64 and ratio.max() <= 1.5 + 1 / 64


def test_time_stretch_one_factor_per_window_within_range_that_also_stretches_the_held_pitches():
  dt = np.tile(np.linspace(0.01, 2.0, 7, dtype=np.float32), (500, 1))
  held = random_held(np.random.default_rng(1), 500)
  stretched_dt, stretched_held = input_pipeline.stretch_time(dt, held, np.random.default_rng(0), 0.2)
  ratio = stretched_dt / dt
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-6)
  assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6 and ratio.std() > 0.05
  np.testing.assert_array_equal(stretched_held < 0, held < 0)
  np.testing.assert_allclose(np.where(held >= 0, stretched_held, 0), np.where(held >= 0, held * ratio[:, :1], 0),
                             rtol=1e-5)


def test_unaugmented_windows_are_stored_events(data_dir):
  batch = next(input_pipeline.train_iterator(no_augmentation(), data_dir))
  train = store.open_split(data_dir, "train")
  for row in range(BATCH):
    start = round(float(batch["inputs"]["dt"][row, 0]) * 64) - 1
    window = {f: batch["inputs"][f][row] for f in store.FIELDS}
    assert any(all((getattr(train.piece(i), f)[start:start + WINDOW] == window[f]).all()
                   for f in store.FIELDS)
               for i in range(train.num_pieces) if start + WINDOW < train.lengths[i])


def test_pieces_drawn_in_proportion_to_length_and_short_never(tmp_path):
  lengths = (100, 200, 400, WINDOW)
  store.write_corpus(tmp_path, {"train": [piece(n, pitch=i) for i, n in enumerate(lengths)]})
  config = no_augmentation()
  config.train.batch_size = 1000
  pitch = np.concatenate([b["inputs"]["pitch"][:, 0] for b in
                          take(input_pipeline.train_iterator(config, tmp_path), 4)])
  counts = np.bincount(pitch, minlength=4)
  expected = np.array([1, 2, 4, 0]) / 7 * len(pitch)
  assert counts[3] == 0
  np.testing.assert_allclose(counts, expected, atol=4 * np.sqrt(expected.max()))


def test_no_long_enough_piece_is_a_user_error(tmp_path):
  store.write_corpus(tmp_path, {"train": [piece(WINDOW), piece(3)], "validation": [piece(WINDOW)]})
  with pytest.raises(UserError, match="window"):
    input_pipeline.train_iterator(make_config(), tmp_path)
  with pytest.raises(UserError, match="window"):
    input_pipeline.eval_batches(make_config(), tmp_path)


def test_missing_store_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="prepare"):
    input_pipeline.train_iterator(make_config(), tmp_path)


def test_same_seed_same_batches_other_seed_different(data_dir):
  config = make_config()
  first = take(input_pipeline.train_iterator(config, data_dir), 3)
  assert_batches_equal(first, take(input_pipeline.train_iterator(config, data_dir), 3))
  config.seed = 1
  other = take(input_pipeline.train_iterator(config, data_dir), 3)
  assert not np.array_equal(first[0]["inputs"]["dt"], other[0]["inputs"]["dt"])


def test_shards_split_the_batch_and_differ(data_dir):
  config = make_config()
  shards = [next(input_pipeline.train_iterator(config, data_dir, shard_index=i, shard_count=2))
            for i in range(2)]
  assert shards[0]["inputs"]["pitch"].shape == (BATCH // 2, WINDOW)
  assert not np.array_equal(shards[0]["inputs"]["dt"], shards[1]["inputs"]["dt"])
  with pytest.raises(UserError, match="evenly"):
    input_pipeline.train_iterator(config, data_dir, shard_count=3)


def test_transform_pickles_without_the_events(data_dir):
  config = make_config()
  offsets = store.open_split(data_dir, "train").offsets
  transform = input_pipeline.TrainBatch(
      str(data_dir), "train", offsets, input_pipeline.piece_weights(offsets, WINDOW), 0, BATCH,
      WINDOW, input_pipeline.Augmentation.from_config(config.data))
  batch = transform.map(7)
  copy = pickle.loads(pickle.dumps(transform))
  assert "events" in transform.__dict__ and "events" not in copy.__dict__
  assert_batches_equal([batch], [copy.map(7)])


def test_restored_iterator_continues_with_the_next_batch(data_dir):
  config = make_config()
  iterator = input_pipeline.train_iterator(config, data_dir)
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 2)
  resumed = input_pipeline.train_iterator(config, data_dir)
  resumed.set_state(state)
  assert_batches_equal(expected, take(resumed, 2))


def test_orbax_round_trip_continues_with_the_next_batch(data_dir, tmp_path):
  config = make_config()
  iterator = input_pipeline.train_iterator(config, data_dir)
  take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = take(iterator, 2)
  resumed = input_pipeline.train_iterator(config, data_dir)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_batches_equal(expected, take(resumed, 2))


def test_worker_processes_give_the_same_batches_and_resume(data_dir):
  in_process = take(input_pipeline.train_iterator(make_config(), data_dir), 5)
  config = make_config(workers=2)
  iterator = input_pipeline.train_iterator(config, data_dir)
  try:
    assert_batches_equal(in_process[:3], take(iterator, 3))
    state = iterator.get_state()
  finally:
    iterator.close()
  resumed = input_pipeline.train_iterator(config, data_dir)
  try:
    resumed.set_state(state)
    assert_batches_equal(in_process[3:], take(resumed, 2))
  finally:
    resumed.close()


def test_eval_stream_is_fixed_unaugmented_and_masked(data_dir):
  config = make_config(transpose=6)
  batches = input_pipeline.eval_batches(config, data_dir, batch_size=4)
  assert_batches_equal(batches, input_pipeline.eval_batches(config, data_dir, batch_size=4))
  assert [b["mask"].tolist() for b in batches] == [[1.0] * 4, [1.0] * 4, [1.0, 1.0, 0.0, 0.0]]
  assert all(b["mask"].dtype == np.float32 for b in batches)
  last = batches[-1]
  for field in store.FIELDS:
    assert not last["inputs"][field][2:].any()
    np.testing.assert_array_equal(last["inputs"][field][:2, 1:], last["targets"][field][:2, :-1])
  validation = store.open_split(data_dir, "validation")
  real = np.concatenate([b["inputs"]["pitch"] for b in batches])[:10]
  starts = np.rint(np.concatenate([b["inputs"]["dt"] for b in batches])[:10, 0] * 64).astype(int) - 1
  pieces = [validation.piece(0)] * 4 + [validation.piece(2)] * 6
  assert starts.tolist() == [0, 3, 6, 10, 1, 5, 8, 11, 15, 18]
  for row, (p, start) in enumerate(zip(pieces, starts)):
    np.testing.assert_array_equal(real[row], p.pitch[start:start + WINDOW])
