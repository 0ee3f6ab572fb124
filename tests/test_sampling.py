"""Sampling and generation: pitch filters, event decoding, the scan against a step-by-step loop, primers, the
files `generate` writes, user errors."""

import functools

import jax
import jax.numpy as jnp
import mido
import note_seq
import numpy as np
import pretty_midi
import pytest
import scipy.stats
from flax import nnx

from musicgen_jax import checkpointing, distributions, events, generate, models, sampling, steps, store
from musicgen_jax.config import apply_overrides, load_config, save_config
from musicgen_jax.errors import UserError
from tests.test_events import midi_problems

LENGTH = 48


def tiny_config(heads="regression"):
  return apply_overrides(load_config("tiny"), ["model.hidden=32", "model.embed=8", "sample.release_threshold=0.5",
                                               f"model.heads={heads}"])


def settings(temperature=1.0, top_k=0, top_p=1.0, max_dt=4.0, release_threshold=0.5, time_temperature=1.0,
             velocity_temperature=1.0):
  return sampling.Settings(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(max_dt),
                           jnp.float32(release_threshold), jnp.float32(time_temperature),
                           jnp.float32(velocity_temperature))


@pytest.fixture(scope="module")
def model_parts():
  """A freshly initialised tiny model whose time head predicts about 50 ms, as graph and parameters."""
  graphdef, state = steps.create_train_state(tiny_config())
  state.params["time_head"]["out"]["bias"][...] = jnp.full((1,), 0.05)
  return graphdef, state


@pytest.fixture(scope="module")
def model(model_parts):
  graphdef, state = model_parts
  return nnx.merge(graphdef, state.params)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_parts):
  """A run folder: the tiny config and one checkpoint of the initialised state, no training."""
  workdir = tmp_path_factory.mktemp("run")
  save_config(tiny_config(), workdir)
  manager = checkpointing.checkpoint_manager(workdir)
  checkpointing.save(manager, 1, model_parts[1], None)
  manager.wait_until_finished()
  manager.close()
  return workdir


@pytest.fixture(scope="module")
def primer_file(tmp_path_factory):
  """An ascending scale of 10 notes, 0.2 s apart, each held 0.15 s."""
  pitch = np.repeat(np.arange(60, 70), 2).astype(np.uint8)
  velocity = np.tile([90, 0], 10).astype(np.uint8)
  dt = np.tile([0.05, 0.15], 10).astype(np.float32)
  path = tmp_path_factory.mktemp("primer") / "scale.mid"
  events.write_midi(store.Events(pitch, dt, velocity), path)
  return path


def draws(logits, count=4000, **kwargs):
  """`count` pitches sampled from the same logits [V], each with its own key."""
  keys = sampling.sequence_keys(0, 0, count)
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (count, len(logits)))
  return np.asarray(sampling.sample_pitch(sampling.uniform(keys), rows, settings(**kwargs)))


PROBS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))


def test_settings_are_the_run_config_s_unless_an_option_overrides_them():
  config = apply_overrides(tiny_config(), ["sample.top_p=0.9", "sample.velocity_temperature=0.5"])
  own = sampling.make_settings(config)
  assert (float(own.top_p), float(own.velocity_temperature), float(own.temperature)) == pytest.approx((0.9, 0.5, 1.0))
  given = sampling.make_settings(config, top_p=1.0, temperature=0.8, top_k=4)
  assert (float(given.top_p), float(given.velocity_temperature), float(given.temperature)) == pytest.approx(
      (1.0, 0.5, 0.8))
  assert int(given.top_k) == 4
  with config.unlocked():  # A run saved before the sample.* settings draws from the model's own distribution.
    for name in sampling.SAMPLING_DEFAULTS:
      del config.sample[name]
  assert sampling.make_settings(config) == settings(release_threshold=0.5)


def test_filters_off_leave_logits_unchanged():
  logits = jnp.asarray(PROBS)
  np.testing.assert_array_equal(sampling.filter_logits(logits, jnp.int32(0), jnp.float32(1.0)), logits)


@pytest.mark.parametrize("kwargs, allowed", [
    ({"top_k": 2}, {0, 1}),
    ({"top_k": 1}, {0}),
    ({"top_p": 0.6}, {0, 1}),  # Mass before pitch 2 is 0.65.
    ({"top_p": 0.66}, {0, 1, 2}),
    ({"top_k": 3, "top_p": 0.7}, {0, 1}),  # Nucleus over the top-3 distribution: mass before pitch 2 is 0.81.
    ({"top_k": 2, "top_p": 0.9}, {0, 1}),
])
def test_top_k_and_top_p_never_draw_outside_the_kept_set(kwargs, allowed):
  drawn = set(draws(PROBS, **kwargs).tolist())
  assert drawn == allowed


def sorted_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Which logits [B, V] top-k and top-p keep, by the definition: the k likeliest (in sorted order), then the
  likeliest of those whose mass before them in the top-k distribution is below top_p, then every logit tied
  with the least kept."""
  descending = -np.sort(-logits, axis=-1)
  keep = np.broadcast_to((np.arange(logits.shape[-1]) < top_k) | (top_k <= 0), logits.shape)
  probs = np.exp(np.where(keep, descending, -np.inf) - descending[:, :1])
  probs /= probs.sum(-1, keepdims=True)
  keep = keep & ((np.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1.0))
  return logits >= np.min(np.where(keep, descending, np.inf), axis=-1, keepdims=True)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.3), (0, 0.98), (1, 1.0), (3, 0.9), (10, 1.0), (50, 0.98)])
def test_the_filter_keeps_what_a_sort_keeps(top_k, top_p):
  """The bisection finds the thresholds a sort would, with ties (rounded logits) at the k-th class and masked
  classes."""
  rng = np.random.default_rng(top_k)
  logits = rng.normal(0.0, 3.0, (256, 128)).astype(np.float32)
  logits[:64] = np.round(logits[:64])
  logits[128:][rng.random((128, 128)) < 0.6] = -np.inf
  kept = np.isfinite(sampling.filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
  expected = sorted_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(kept, expected)
  assert (expected.sum(-1) < np.isfinite(logits).sum(-1)).any()


def test_no_filter_draws_every_pitch_in_proportion():
  counts = np.bincount(draws(PROBS, count=20000), minlength=len(PROBS)) / 20000
  np.testing.assert_allclose(counts, np.exp(PROBS), atol=0.015)


def test_categorical_never_draws_impossible_pitches_first_middle_or_last():
  logits = jnp.log(jnp.asarray([0.0, 0.5, 0.0, 0.2, 0.3, 0.0]))
  counts = np.bincount(draws(logits, count=20000), minlength=6) / 20000
  assert counts[0] == counts[2] == counts[5] == 0
  np.testing.assert_allclose(counts, np.exp(logits), atol=0.015)


def test_the_first_passing_class_never_has_weight_zero_where_rounding_unorders_the_sums():
  # Sums an ulp out of order, as the associative scan's rounding leaves them: counting the sums at or below
  # the point would name the class of weight zero (1), and nothing passes the point in the second row.
  weights = jnp.asarray([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  cumulative = jnp.asarray([[1.0, np.nextafter(np.float32(1), np.float32(0)), 2.0],
                            [1.0, 2.0, np.nextafter(np.float32(2), np.float32(0))]])
  point = jnp.asarray([np.nextafter(np.float32(1), np.float32(0)), 2.0])
  assert sampling.first_passing(weights, cumulative, point).tolist() == [0, 1]


@pytest.mark.parametrize("count", [3, 128, 401])
def test_categorical_draws_each_possible_class_with_its_probability(count):
  # Rows of random logits with a third of the classes impossible, whole blocks of them in the middle rows.
  rows = 60000
  rng = np.random.default_rng(count)
  logits = np.repeat(rng.normal(0.0, 2.0, (3, count)), rows // 3, axis=0)
  possible = np.repeat(rng.random((3, count)) < 0.67, rows // 3, axis=0)
  possible[rows // 3:2 * rows // 3, :count // 2] = False
  possible[:, -1] |= ~possible.any(axis=1)
  logits = np.where(possible, logits, -np.inf).astype(np.float32)
  drawn = np.asarray(jax.jit(sampling.categorical)(jax.random.uniform(jax.random.key(0), (rows,)), jnp.asarray(logits)))
  assert possible[np.arange(rows), drawn].all()
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
  # Randomized probability integral transform: uniform on [0, 1) exactly when each class has its probability.
  below = np.cumsum(probs, -1)[np.arange(rows), drawn] - probs[np.arange(rows), drawn]
  assert scipy.stats.kstest(below + rng.random(rows) * probs[np.arange(rows), drawn], "uniform").pvalue > 0.001


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_logits(temperature):
  counts = np.bincount(draws(PROBS, count=20000, temperature=temperature), minlength=len(PROBS)) / 20000
  expected = np.exp(PROBS / temperature) / np.exp(PROBS / temperature).sum()
  np.testing.assert_allclose(counts, expected, atol=0.015)


def test_velocity_rounds_clips_and_releases_below_threshold():
  predicted = jnp.asarray([0.3, 0.49, 0.51, 0.6, 1.4, 64.4, 200.0, -3.0]) / 127
  np.testing.assert_array_equal(sampling.decode_velocity(predicted, jnp.float32(0.5)),
                                [0, 0, 1, 1, 1, 64, 127, 0])
  np.testing.assert_array_equal(sampling.decode_velocity(predicted, jnp.float32(20.0)),
                                [0, 0, 0, 0, 0, 64, 127, 0])


# Compiled once per test instead of op by op, whose many small compiles took most of these tests' time.
next_event = jax.jit(sampling.next_event)


def test_dt_is_clipped_to_zero_and_max_dt():
  outputs = {"pitch_logits": jnp.zeros((3, 128)), "dt": jnp.asarray([-1.0, 0.3, 9.0]), "velocity": jnp.zeros(3)}
  event = next_event(outputs, sampling.sequence_keys(0, 0, 3), settings(max_dt=2.0))
  np.testing.assert_allclose(event["dt"], [0.0, 0.3, 2.0])


def sample_from_start(model_parts, seed, count=3, length=LENGTH, **kwargs):
  graphdef, state = model_parts
  start_state, event = sampling.start(nnx.merge(graphdef, state.params))
  return sampling.sample_compiled(graphdef, state.params, start_state, event, sampling.sequence_keys(seed, 0, count),
                                  settings(**kwargs), length)[0]


def test_same_seed_same_events_other_seed_other_events(model_parts):
  first, again, other = (sample_from_start(model_parts, seed) for seed in (0, 0, 1))
  for field in store.FIELDS:
    np.testing.assert_array_equal(first[field], again[field])
  assert not np.array_equal(first["pitch"], other["pitch"])
  assert first["pitch"].shape == (3, LENGTH)


@functools.partial(jax.jit, static_argnames="graphdef")
def reference_step(graphdef, params, state, event, keys, config_settings, sounding=None):
  """One event through the model from `state`, and the event drawn from its outputs."""
  outputs, state = nnx.merge(graphdef, params)(jax.tree.map(lambda x: x[:, None], event), state)
  return state, sampling.next_event(jax.tree.map(lambda x: x[:, 0], outputs), keys, config_settings, sounding)


def reference_loop(model_parts, state, event, keys, config_settings, length):
  """The scan written as a Python loop over single-event model calls, tracking the sounding pitches."""
  graphdef, train_state = model_parts
  state, event = jax.tree.map(lambda x: jnp.broadcast_to(x, (keys.shape[0], *x.shape[1:])), (state, event))
  sounding = np.zeros((keys.shape[0], 128), bool)
  result = []
  for t in range(length):
    state, event = reference_step(graphdef, train_state.params, state, event, sampling.step_keys(keys, t),
                                  config_settings, jnp.asarray(sounding))
    for row, (pitch, velocity) in enumerate(zip(np.asarray(event["pitch"]), np.asarray(event["velocity"]))):
      sounding[row, pitch] = velocity > 0
    result.append(event)
  return {k: np.stack([e[k] for e in result], 1) for k in event}


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (10, 0.9)])
def test_scan_equals_step_by_step_loop(model_parts, model, top_k, top_p):
  graphdef, state = model_parts
  start_state, event = sampling.start(model)
  keys = sampling.sequence_keys(3, 0, 2)
  config_settings = settings(top_k=top_k, top_p=top_p)
  scanned, _ = sampling.sample_compiled(graphdef, state.params, start_state, event, keys, config_settings, 20)
  expected = reference_loop(model_parts, start_state, event, keys, config_settings, 20)
  np.testing.assert_array_equal(scanned["pitch"], expected["pitch"])
  np.testing.assert_array_equal(scanned["velocity"], expected["velocity"])
  np.testing.assert_allclose(scanned["dt"], expected["dt"], rtol=1e-5, atol=1e-6)


def test_start_event_is_a_release_of_middle_c_from_the_zero_state(model):
  state, event = sampling.start(model)
  assert {k: float(v[0]) for k, v in event.items()} == {"pitch": 60, "dt": 0.0, "velocity": 0.0}
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state))


def test_primed_state_equals_the_model_over_the_primer(model_parts, model, primer_file):
  graphdef, train_state = model_parts
  primer = sampling.as_inputs(events.midi_to_events(primer_file))
  state, last = sampling.prime_compiled(graphdef, train_state.params, primer)
  keys = sampling.sequence_keys(0, 0, 1)
  after_last, first = reference_step(graphdef, train_state.params, state, last, sampling.step_keys(keys, 0), settings())
  outputs, after_primer = nnx.jit(lambda model: model(primer))(model)
  for a, b in zip(jax.tree.leaves(after_last), jax.tree.leaves(after_primer)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  expected = next_event(jax.tree.map(lambda x: x[:, -1], outputs), sampling.step_keys(keys, 0), settings())
  assert int(first["pitch"][0]) == int(expected["pitch"][0])
  sampled, _ = sampling.sample_compiled(graphdef, train_state.params, state, last, keys, settings(), 1)
  assert int(sampled["pitch"][0, 0]) == int(expected["pitch"][0])


def test_single_event_primer_starts_from_the_zero_state(model):
  primer = {"pitch": jnp.asarray([[64]]), "dt": jnp.zeros((1, 1)), "velocity": jnp.full((1, 1), 80.0)}
  state, last = sampling.prime(model, primer)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state))
  assert int(last["pitch"][0]) == 64 and float(last["velocity"][0]) == 80.0


def write_files(run_dir, out_dir, **kwargs):
  return generate.generate(run_dir, out_dir, **{"length": LENGTH, "progress": False, **kwargs})


def notes(path):
  """Rows (start, pitch, velocity) of every note pretty_midi reads, in time order."""
  midi = pretty_midi.PrettyMIDI(str(path))
  return np.array(sorted((n.start, n.pitch, n.velocity) for i in midi.instruments for n in i.notes)).reshape(-1, 3)


def assert_same_notes(actual, expected):
  """Same pitches and velocities, start times equal up to the file's tick (1/3840 s)."""
  assert actual.shape == expected.shape
  np.testing.assert_array_equal(actual[:, 1:], expected[:, 1:])
  np.testing.assert_allclose(actual[:, 0], expected[:, 0], atol=1e-3)


def test_files_are_valid_complete_and_reproducible(run_dir, tmp_path):
  paths = write_files(run_dir, tmp_path / "a", num=5, batch_size=2, seed=7)
  assert [p.name for p in paths] == [f"sample_{i}.mid" for i in range(5)]
  again = write_files(run_dir, tmp_path / "b", num=5, batch_size=2, seed=7)
  other = write_files(run_dir, tmp_path / "c", num=5, batch_size=2, seed=8)
  for path, same, different in zip(paths, again, other):
    assert path.read_bytes() == same.read_bytes()
    assert path.read_bytes() != different.read_bytes()
    messages = [m for m in mido.MidiFile(path) if m.type in ("note_on", "note_off")]
    onsets = [m for m in messages if m.type == "note_on" and m.velocity > 0]
    assert onsets and len(onsets) == len(messages) - len(onsets)
    assert len(note_seq.midi_file_to_note_sequence(str(path)).notes) == len(onsets) == len(notes(path))
  assert len({p.read_bytes() for p in paths}) == 5


def test_many_generated_files_are_clean(run_dir, tmp_path):
  # The untrained model writes onsets only: once all 128 pitches sound, it strikes sounding ones again.
  for path in write_files(run_dir, tmp_path, num=32, length=256, batch_size=32):
    assert midi_problems(path) == [], path.name


@pytest.fixture(scope="module")
def distribution_run_dir(tmp_path_factory):
  """A run folder of an initialised tiny model with distribution heads, no training."""
  workdir = tmp_path_factory.mktemp("distribution-run")
  config = tiny_config("distribution")
  save_config(config, workdir)
  manager = checkpointing.checkpoint_manager(workdir)
  checkpointing.save(manager, 1, steps.create_train_state(config)[1], None)
  manager.wait_until_finished()
  manager.close()
  return workdir


def test_files_measured_in_seconds_are_clean_and_end_there(distribution_run_dir, tmp_path):
  paths = write_files(distribution_run_dir, tmp_path, num=6, batch_size=3, length=None, seconds=20.0)
  for path in paths:
    assert midi_problems(path) == [], path.name
    music = float(np.sum(events.midi_to_events(path, sustain=False).dt))
    assert 15.0 < music <= 20.0 + events.MIN_NOTE_SECONDS
  again = write_files(distribution_run_dir, tmp_path / "again", num=6, batch_size=3, length=None, seconds=20.0)
  assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_earlier_files_are_never_replaced_without_overwrite(run_dir, tmp_path):
  (first,) = write_files(run_dir, tmp_path, seed=1)
  before = first.read_bytes()
  with pytest.raises(UserError, match="already exists.*--overwrite"):
    write_files(run_dir, tmp_path, seed=2)
  assert first.read_bytes() == before
  write_files(run_dir, tmp_path, seed=2, overwrite=True)
  assert first.read_bytes() != before


def test_files_hold_the_sampled_events(run_dir, model_parts, tmp_path):
  graphdef, state = model_parts
  (path,) = write_files(run_dir, tmp_path, seed=4, top_k=20, top_p=0.9)
  start_state, event = sampling.start(nnx.merge(graphdef, state.params))
  sampled, _ = sampling.sample_compiled(graphdef, state.params, start_state, event, sampling.sequence_keys(4, 0, 1),
                                        settings(top_k=20, top_p=0.9), LENGTH)
  expected = sampling.to_events(jax.device_get(sampled), 0)
  written = events.midi_to_events(path, sustain=False)
  onset = expected.velocity > 0
  start = np.cumsum(expected.dt, dtype=np.float64)[onset]
  assert_same_notes(notes(path), np.array(sorted(zip(start, expected.pitch[onset], expected.velocity[onset]))))
  assert np.sum(written.velocity > 0) == np.sum(onset)


def test_one_compile_for_all_batches_and_sampling_values(run_dir, tmp_path):
  sampling.sample_compiled.clear_cache()
  write_files(run_dir, tmp_path / "a", num=5, batch_size=2, temperature=0.7)
  write_files(run_dir, tmp_path / "b", num=3, batch_size=2, top_k=5, top_p=0.5, seed=3)
  assert sampling.sample_compiled._cache_size() == 1


def test_names_are_zero_padded_and_prefixed(run_dir, tmp_path):
  paths = write_files(run_dir, tmp_path, num=11, batch_size=11, length=4, prefix="take")
  assert [p.name for p in paths] == sorted(p.name for p in tmp_path.iterdir())
  assert paths[0].name == "take_00.mid" and paths[-1].name == "take_10.mid"


def test_primer_opens_the_file_only_when_kept(run_dir, primer_file, tmp_path):
  (kept,) = write_files(run_dir, tmp_path / "kept", primer=primer_file, primer_events=12, keep_primer=True)
  (dropped,) = write_files(run_dir, tmp_path / "dropped", primer=primer_file, primer_events=12)
  (unprimed,) = write_files(run_dir, tmp_path / "unprimed")
  primer_notes = notes(primer_file)[:6]  # The first 12 events: 6 notes.
  continuation = notes(dropped)
  primer_end = 0.05 + 0.2 * 5 + 0.15  # The 12th event: the release of the 6th note.
  assert_same_notes(notes(kept)[:6], primer_notes)
  assert_same_notes(notes(kept)[6:], continuation + [primer_end, 0, 0])
  assert dropped.read_bytes() != unprimed.read_bytes()


@pytest.mark.parametrize("kwargs, message", [
    ({"num": 0}, "num"),
    ({"length": -1}, "length"),
    ({"length": 0}, "length"),
    ({"length": 8, "seconds": 5.0}, "not both"),
    ({"length": None, "seconds": 0.0}, "--seconds"),
    ({"time_temperature": 0.0}, "time temperature"),
    ({"velocity_temperature": -1.0}, "velocity temperature"),
    ({"batch_size": 0}, "batch size"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top-k"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_p": 1.5}, "top-p"),
    ({"seed": 2**64}, "seed"),
    ({"primer_events": 3}, "needs a primer"),
    ({"keep_primer": True}, "needs a primer"),
    ({"prefix": "../escape"}, "path separators"),
    ({"prefix": ""}, "prefix"),
    ({"checkpoint": 99}, "no checkpoint at step 99"),
    ({"notes_per_second": 0.0}, "notes-per-second"),
    ({"notes_per_second": 5.0}, "model.condition=none"),
    ({"polyphony": -1.0}, "--polyphony"),
    ({"polyphony": 3.0}, "polyphony control"),
])
def test_user_mistakes_raise_user_error(run_dir, tmp_path, kwargs, message):
  with pytest.raises(UserError, match=message):
    write_files(run_dir, tmp_path, **kwargs)
  assert not list(tmp_path.iterdir())


def test_missing_run_and_missing_checkpoint_raise_user_error(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    write_files(tmp_path / "nowhere", tmp_path / "out")
  save_config(tiny_config(), tmp_path)
  with pytest.raises(UserError, match="no checkpoints"):
    write_files(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("content", [None, b"", b"not a midi file at all"])
def test_unreadable_primer_raises_user_error(run_dir, tmp_path, content):
  primer = tmp_path / "primer.mid"
  if content is not None:
    primer.write_bytes(content)
  with pytest.raises(UserError, match="cannot read primer"):
    write_files(run_dir, tmp_path / "out", primer=primer)


def test_output_folder_that_is_a_file_raises_user_error(run_dir, tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="cannot create output folder"):
    write_files(run_dir, tmp_path / "file")


def test_releases_name_sounding_pitches_and_onsets_silent_ones():
  sounding = jnp.zeros((4, 128), bool).at[0, 60].set(True).at[1, 64].set(True).at[3, :].set(True)
  outputs = {"pitch_logits": jnp.zeros((4, 128)).at[:, 70].set(50.0), "dt": jnp.zeros(4),
             "velocity": jnp.asarray([0.0, 0.8, 0.0, 0.0])}
  event = next_event(outputs, sampling.sequence_keys(0, 0, 4), settings(release_threshold=30.0), sounding)
  assert int(event["pitch"][0]) == 60 and float(event["velocity"][0]) == 0.0  # release of the one sounding pitch
  assert int(event["pitch"][1]) == 70 and float(event["velocity"][1]) == round(0.8 * 127)  # onset, not 64
  assert int(event["pitch"][2]) == 70 and float(event["velocity"][2]) == 30.0  # nothing sounds: an onset
  assert float(event["velocity"][3]) == 0.0  # everything sounds: a release of any pitch
  held = jnp.where(sounding, 0.25, -1.0)
  after = sampling.update_held(held, dict(event, dt=jnp.asarray([0.5, 0.1, 0.0, 0.2]))) >= 0
  assert not after[0, 60] and after[1, 70] and after[2, 70] and not after[3, int(event["pitch"][3])]


def test_held_pitches_age_by_each_event_dt_and_restart_at_an_onset():
  held = jnp.asarray([[-1.0, 0.5, 2.0]]).repeat(2, 0)
  held = jnp.pad(held, ((0, 0), (0, 125)), constant_values=-1.0)
  after = sampling.update_held(held, {"pitch": jnp.asarray([0, 2]), "dt": jnp.asarray([0.25, 0.125]),
                                      "velocity": jnp.asarray([90.0, 0.0])})
  np.testing.assert_array_equal(after[:, :3], [[0.0, 0.75, 2.25], [-1.0, 0.625, -1.0]])
  assert (after[:, 3:] == -1.0).all()


def test_generated_files_have_no_release_without_a_sounding_note(model_parts):
  sampled = sample_from_start(model_parts, 0, count=4, length=200, release_threshold=60.0)
  for row in range(4):
    sounding = np.zeros(128, bool)
    for pitch, velocity in zip(sampled["pitch"][row], sampled["velocity"][row]):
      assert sounding[pitch] != (velocity > 0)
      sounding[pitch] = velocity > 0


SHARDED_GENERATION = """
import sys
import jax
from musicgen_jax import generate, sampling

assert jax.device_count() == 4
replicated, sharded = sampling.device_placement(8)
assert len(sharded.device_set) == 4 and len(sampling.device_placement(6)[1].device_set) == 1
paths = generate.generate(sys.argv[1], sys.argv[2], num=8, batch_size=8, length=40, seed=5, progress=False)
print(len(paths))
"""


def test_generation_shards_its_batch_over_all_devices(run_dir, tmp_path, four_cpu_devices):
  import subprocess
  import sys

  result = subprocess.run([sys.executable, "-c", SHARDED_GENERATION, str(run_dir), str(tmp_path / "sharded")],
                          env=four_cpu_devices, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  single = write_files(run_dir, tmp_path / "single", num=8, batch_size=8, length=40, seed=5)
  sharded = sorted((tmp_path / "sharded").glob("*.mid"))
  assert [p.name for p in sharded] == [p.name for p in single]
  assert [p.read_bytes() for p in sharded] == [p.read_bytes() for p in single]


def test_primer_length_defaults_to_a_cap(primer_file, monkeypatch):
  monkeypatch.setattr(generate, "DEFAULT_PRIMER_EVENTS", 5)
  assert len(generate.read_primer(primer_file, None, True)) == 5
  assert len(generate.read_primer(primer_file, 7, True)) == 7


def distribution_model(order: str, seed: int = 0, time_mixture: int = 0):
  """A tiny distribution-head model whose output layers are scaled up, so that every head is far from uniform."""
  config = apply_overrides(tiny_config("distribution"), [f"model.order={tuple(order.split(','))!r}",
                                                          f"model.time_mixture={time_mixture}"])
  model = models.MusicLSTM(config.model, rngs=nnx.Rngs(params=seed))
  for head in (model.pitch_head, model.time_head, model.velocity_head):
    head.out.kernel.value = head.out.kernel.value * 30.0
  return config, model


def class_probabilities(model, name, logits, allowed, temperature):
  """The probability [rows, classes] of each class of sub-event `name` from its head's output at `temperature`."""
  if name == "time":
    tempered = distributions.temper_time(logits, temperature, model.time_bins)
    if model.time_bins.mixture:
      classes = jnp.arange(model.time_bins.count)[None, :]
      return np.exp(-np.asarray(distributions.time_nll(tempered[:, None, :], classes, model.time_bins), np.float64))
    return np.asarray(jax.nn.softmax(tempered), np.float64)
  return np.asarray(jax.nn.softmax(jnp.where(allowed, logits / temperature, -jnp.inf)), np.float64)


@pytest.mark.parametrize("order, time_mixture", [("pitch,velocity,time", 0), ("velocity,time,pitch", 0),
                                                 ("time,pitch,velocity", 3)])
def test_each_sub_event_is_drawn_from_its_masked_tempered_distribution(order, time_mixture):
  config, model = distribution_model(order, time_mixture=time_mixture)
  rows = 6000
  rng = np.random.default_rng(0)
  features = jnp.asarray(np.repeat(rng.normal(size=(3, 32)), rows // 3, axis=0), jnp.float32)
  sounding = jnp.asarray(rng.random((rows, 128)) < np.repeat([0.0, 0.05, 0.5], rows // 3)[:, None])
  held = jnp.where(sounding, jnp.asarray(rng.exponential(0.5, (rows, 128)), jnp.float32), -1.0)
  drawn_settings = settings(time_temperature=0.7, velocity_temperature=1.5)
  event = nnx.jit(sampling.draw_event)(model, features, sampling.sequence_keys(1, 0, rows), drawn_settings, held)
  drawn = distributions.classes(event, model.time_bins)
  temperatures = {"pitch": 1.0, "time": 0.7, "velocity": 1.5}
  # Randomized probability integral transform: uniform on [0, 1) exactly when each class is drawn with
  # the modelled probability given the sub-events before it.
  for name in model.order:
    logits = nnx.jit(lambda model, features, drawn, held: model.head_logits(
        name, features, drawn, models.read_held(held), isolate_heads=False, rngs=None))(model, features, drawn, held)
    allowed = sampling.allowed_classes(name, drawn, sounding, logits.shape[-1])
    probs = class_probabilities(model, name, logits, allowed, temperatures[name])
    k = np.asarray(drawn[name])
    assert np.all(probs[np.arange(rows), k] > 0)
    below = np.cumsum(probs, -1)[np.arange(rows), k] - probs[np.arange(rows), k]
    uniform = below + rng.random(rows) * probs[np.arange(rows), k]
    assert scipy.stats.kstest(uniform, "uniform").pvalue > 0.001, name


@pytest.mark.parametrize("order", ["pitch,velocity,time", "velocity,pitch,time", "time,pitch,velocity"])
def test_distribution_heads_release_only_sounding_pitches_and_strike_only_silent_ones(order):
  config, model = distribution_model(order, seed=3)
  graphdef, params = nnx.split(model, nnx.Param)
  start_state, event = sampling.start(model)
  sampled, _ = sampling.sample_compiled(graphdef, params, start_state, event, sampling.sequence_keys(2, 0, 4),
                                        settings(), 300)
  releases = 0
  for row in range(4):
    sounding = np.zeros(128, bool)
    for pitch, velocity in zip(sampled["pitch"][row], sampled["velocity"][row]):
      assert sounding[pitch] != (velocity > 0)
      sounding[pitch] = velocity > 0
      releases += velocity == 0
  assert releases > 0
  assert np.all(np.asarray(sampled["dt"]) <= 4.0) and np.all(np.asarray(sampled["dt"]) >= 0.0)


@pytest.mark.parametrize("heads", ["regression", "distribution"])
def test_a_continuation_from_the_carry_draws_what_one_longer_call_draws(heads):
  graphdef, state = steps.create_train_state(tiny_config(heads))
  start_state, event = sampling.start(nnx.merge(graphdef, state.params))
  keys = sampling.sequence_keys(6, 0, 2)
  whole, _ = sampling.sample_compiled(graphdef, state.params, start_state, event, keys, settings(), 30)
  first, carry = sampling.sample_compiled(graphdef, state.params, start_state, event, keys, settings(), 15)
  second, _ = sampling.sample_compiled(graphdef, state.params, *carry[:2], keys, settings(), 15, carry[2], 15)
  for field in store.FIELDS:
    np.testing.assert_allclose(np.concatenate([first[field], second[field]], 1), whole[field], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["pitch,velocity,time", "velocity,pitch,time", "time,pitch,velocity"])
def test_the_sampler_reads_what_the_training_model_reads(order):
  # Drawn near temperature 0, every sub-event is the likeliest allowed class of the distribution the training
  # path (the whole window at once, teacher-forced on the drawn events) gives it: the sampler's state, carried
  # held pitches and conditioning are the ones the model was trained on, position by position.
  config, model = distribution_model(order, seed=1)
  for head in (model.pitch_head, model.time_head, model.velocity_head):
    for layer in (head.own_out, head.release_age):  # Zero at initialisation: give them weight.
      if layer is not None:
        layer.kernel.value = jax.random.normal(jax.random.key(2), layer.kernel.value.shape)
  graphdef, params = nnx.split(model, nnx.Param)
  state, start = sampling.start(model)
  cold = settings(temperature=1e-4, time_temperature=1e-4, velocity_temperature=1e-4)
  sampled, _ = sampling.sample_compiled(graphdef, params, state, start, sampling.sequence_keys(0, 0, 4), cold, 96)
  inputs = {k: jnp.concatenate([jnp.broadcast_to(start[k][:, None], (4, 1)), sampled[k][:, :-1]], 1) for k in sampled}
  outputs, _ = nnx.jit(lambda model: model(inputs, targets=sampled))(model)
  sounding = models.held_pitches(inputs["pitch"], inputs["dt"], inputs["velocity"]).reshape(-1, 128) >= 0
  drawn = {k: v.reshape(-1) for k, v in distributions.classes(sampled, model.time_bins).items()}
  for name in model.order:
    logits = outputs[f"{name}_logits"].reshape(len(drawn[name]), -1)
    allowed = sampling.allowed_classes(name, drawn, sounding, logits.shape[-1])
    likeliest = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    chosen = jnp.take_along_axis(logits, drawn[name][:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(chosen, likeliest, atol=1e-3, err_msg=name)


def test_a_set_s_controls_are_drawn_from_the_quantiles_one_in_each_slice():
  config = apply_overrides(tiny_config("distribution"), ["model.condition=density+polyphony",
                                                         "sample.density_quantiles=(2.0, 8.0, 32.0)",
                                                         "sample.polyphony_quantiles=(1.0, 4.0, 16.0)"])
  in_units = lambda controls: {name: np.exp(np.asarray(value)) * reference for (name, value), reference in zip(
      controls.items(), (models.DENSITY_REFERENCE, models.POLYPHONY_REFERENCE))}
  drawn = in_units(sampling.sequence_controls(config, 3, 0, 4000))
  for name, low in (("density", 2.0), ("polyphony", 1.0)):
    assert low * (1 - 1e-5) <= drawn[name].min() and drawn[name].max() <= 16 * low * (1 + 1e-5)
    # Log-linear between the quantiles (a value v sits at the point log(v / low) / log(16)), one sequence in each
    # of the 4000 slices of the points.
    offsets = np.sort(np.log(drawn[name] / low) / np.log(16.0)) * 4000 - np.arange(4000)
    assert offsets.min() > -0.01 and offsets.max() < 1.01, (name, offsets.min(), offsets.max())
  # Each control in its own order: the two draws are unrelated.
  assert abs(np.corrcoef(np.log(drawn["density"]), np.log(drawn["polyphony"]))[0, 1]) < 0.05
  # A sequence draws the same controls whatever the batch it is drawn in; another seed draws others.
  later = in_units(sampling.sequence_controls(config, 3, 100, 5, 4000))
  for name in drawn:
    np.testing.assert_allclose(later[name], drawn[name][100:105], rtol=1e-5)
  assert not np.allclose(in_units(sampling.sequence_controls(config, 4, 0, 8))["density"], drawn["density"][:8])
  # Each sequence on its own is a draw from the quantiles: over many seeds of sets of 4, a quarter of the first
  # sequences' densities fall below twice the lowest, half below 4 times, three quarters below 8.
  firsts = np.array([in_units(sampling.sequence_controls(config, seed, 0, 1, 4))["density"][0] for seed in range(400)])
  for factor, share in ((2.0, 0.25), (4.0, 0.5), (8.0, 0.75)):
    assert abs(np.mean(firsts < factor * 2.0) - share) < 0.08, factor
  # A padded last batch (rows past the set) still gets controls in range.
  padded = in_units(sampling.sequence_controls(config, 3, 3996, 8, 4000))
  np.testing.assert_allclose(padded["density"][:4], drawn["density"][3996:], rtol=1e-5)
  assert 2.0 * (1 - 1e-5) <= padded["density"].min() and padded["density"].max() <= 32.0 * (1 + 1e-5)
  told = sampling.sequence_controls(config, 3, 0, 3, 4000, {"density": 5.0, "polyphony": None})
  np.testing.assert_allclose(told["density"], np.log(5.0 / models.DENSITY_REFERENCE), rtol=1e-6)
  np.testing.assert_allclose(in_units(told)["polyphony"], drawn["polyphony"][:3], rtol=1e-5)
  assert sampling.sequence_controls(tiny_config("distribution"), 3, 0, 4) is None
  with pytest.raises(UserError, match="polyphony_quantiles.*--polyphony"):
    sampling.sequence_controls(apply_overrides(config, ["sample.polyphony_quantiles=()"]), 3, 0, 4)


@pytest.mark.parametrize("heads", models.HEAD_MODES)
def test_each_sequence_plays_at_its_own_controls(heads):
  graphdef, state = steps.create_train_state(apply_overrides(tiny_config(heads),
                                                             ["model.condition=density+polyphony"]))
  start_state, event = sampling.start(nnx.merge(graphdef, state.params))
  keys = sampling.sequence_keys(0, 0, 2)
  draw = lambda controls: sampling.sample_compiled(graphdef, state.params, start_state, event, keys, settings(), 24,
                                                   controls={k: jnp.asarray(v) for k, v in controls.items()})[0]
  same = draw({"density": [0.0, 0.0], "polyphony": [0.0, 0.0]})
  for name in ("density", "polyphony"):
    apart = draw({"density": [0.0, 0.0], "polyphony": [0.0, 0.0], name: [0.0, 2.0]})
    for field in store.FIELDS:
      np.testing.assert_array_equal(same[field][0], apart[field][0])
    assert any(not np.array_equal(same[field][1], apart[field][1]) for field in store.FIELDS), name
