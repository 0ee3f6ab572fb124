"""The model: output shapes, causality, both input modes, bfloat16 compute, and the recurrence choices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from musicgen_jax import losses, models
from musicgen_jax.config import apply_overrides, load_config
from musicgen_jax.errors import UserError


def random_inputs(batch: int, window: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "pitch": jnp.asarray(rng.integers(0, 128, (batch, window)), jnp.int32),
      "dt": jnp.asarray(rng.random((batch, window)), jnp.float32),
      "velocity": jnp.asarray(rng.integers(0, 128, (batch, window)), jnp.float32),
  }


def tiny_model(*overrides: str) -> models.MusicLSTM:
  config = apply_overrides(load_config("tiny"), overrides)
  return models.MusicLSTM(config.model, rngs=nnx.Rngs(params=0))


TARGETS = random_inputs(3, 12, seed=5)  # The next events that distribution heads read (teacher forcing).


@nnx.jit
def run(model: models.MusicLSTM, x: dict, state=None, targets=None, held=None, rngs=None) -> tuple[dict, tuple]:
  """The model's call, compiled: op by op its hundreds of small compiles took most of these tests' time."""
  return model(x, state, targets=targets, held=held, rngs=rngs)


def predict(model: models.MusicLSTM, x: dict, state=None, rngs=None) -> tuple[dict, tuple]:
  """The model over `x` with the first positions of TARGETS as the next events."""
  batch, window = x["pitch"].shape
  return run(model, x, state, jax.tree.map(lambda t: t[:batch, :window], TARGETS), None, rngs)


@pytest.mark.parametrize("inputs", models.INPUT_MODES)
@pytest.mark.parametrize("heads", models.HEAD_MODES)
def test_output_shapes(inputs, heads):
  model = tiny_model(f"model.inputs={inputs}", "model.layers=3", f"model.heads={heads}")
  outputs, state = predict(model, random_inputs(3, 7))
  assert outputs["pitch_logits"].shape == (3, 7, 128)
  if heads == "regression":
    assert outputs["dt"].shape == (3, 7)
    assert outputs["velocity"].shape == (3, 7)
  else:
    assert outputs["time_logits"].shape == (3, 7, 401)  # dt = 0, then 10 ms bins up to 4 s.
    assert outputs["velocity_logits"].shape == (3, 7, 128)
  assert len(state) == 3 and state[0].h.shape == (3, 64)


@pytest.mark.parametrize("heads", models.HEAD_MODES)
def test_time_major_outputs_are_the_batch_major_ones_and_score_the_same(heads):
  """The train and evaluation steps score the outputs time-major, as the heads compute them."""
  model, x = tiny_model(f"model.heads={heads}"), random_inputs(3, 12)
  held = jnp.where(jax.random.uniform(jax.random.key(0), (3, 128)) < 0.2, 0.5, models.SILENT)
  outputs = {layout: nnx.jit(lambda model, time_major=layout == "time": model(
      x, targets=TARGETS, held=held, time_major=time_major)[0])(model) for layout in ("batch", "time")}
  for key, value in outputs["batch"].items():
    np.testing.assert_array_equal(models.swap_batch_time(outputs["time"][key]), value)
  weights = losses.position_weights(12, 5)  # The last five positions only: the weights must follow the layout.
  by_batch = losses.event_sums(outputs["batch"], TARGETS, weights, model.time_bins)
  by_time = losses.event_sums(outputs["time"], models.swap_batch_time(TARGETS), weights[:, None], model.time_bins)
  assert by_batch.keys() == by_time.keys()
  for key, value in by_batch.items():
    np.testing.assert_allclose(by_time[key], value, rtol=1e-6)


def test_a_time_mixture_head_outputs_its_parameters():
  model = tiny_model("model.time_mixture=5")
  outputs, _ = predict(model, random_inputs(3, 7))
  assert outputs["time_logits"].shape == (3, 7, 16)  # The dt = 0 logit, then 5 weights, locations and scales.


def test_regression_heads_ignore_the_targets():
  model = tiny_model("model.heads=regression")
  x = random_inputs(2, 6)
  with_targets, _ = predict(model, x)
  without, _ = run(model, x)
  for key in without:
    np.testing.assert_array_equal(with_targets[key], without[key])


def test_distribution_heads_need_targets_outside_sampling():
  with pytest.raises(ValueError, match="targets"):
    tiny_model()(random_inputs(1, 3))


@pytest.mark.parametrize("order", ["pitch,velocity,time", "time,pitch,velocity", "velocity,pitch,time"])
def test_each_head_reads_exactly_the_sub_events_before_it(order):
  model = tiny_model(f"model.order={tuple(order.split(','))!r}")
  x = random_inputs(2, 6)
  targets = jax.tree.map(lambda t: t[:2, :6], TARGETS)
  base, _ = run(model, x, None, targets)
  changes = {"pitch": dict(targets, pitch=(targets["pitch"] + 7) % 128),
             "velocity": dict(targets, velocity=(targets["velocity"] + 40) % 128),
             "time": dict(targets, dt=targets["dt"] + 1.0)}
  names = order.split(",")
  for changed in names:
    outputs, _ = run(model, x, None, changes[changed])
    for reader in names:
      same = np.array_equal(outputs[f"{reader}_logits"], base[f"{reader}_logits"])
      assert same == (names.index(reader) <= names.index(changed)), (changed, reader)


@pytest.mark.parametrize("override, message", [("model.heads=mixture", "model.heads"),
                                               ("model.order=('pitch', 'time')", "model.order")])
def test_unknown_head_settings_are_rejected(override, message):
  with pytest.raises(ValueError, match=message):
    tiny_model(override)


def test_head_widths_follow_the_original():
  model = tiny_model("model.hidden=128", "model.heads=regression")
  assert [layer.kernel.value.shape for layer in model.pitch_head.hidden] == [(128, 64), (64, 32)]
  assert model.time_head.out.kernel.value.shape == (32, 1)


@pytest.mark.parametrize("inputs", models.INPUT_MODES)
def test_causal_outputs_before_a_change_are_unchanged(inputs):
  model = tiny_model(f"model.inputs={inputs}")
  x = random_inputs(2, 12)
  t = 5
  changed = dict(x, pitch=x["pitch"].at[:, t].set((x["pitch"][:, t] + 1) % 128),
                 dt=x["dt"].at[:, t].add(0.5), velocity=x["velocity"].at[:, t].set(0.0))
  before, _ = predict(model, x)
  after, _ = predict(model, changed)
  for key in before:
    np.testing.assert_array_equal(before[key][:, :t], after[key][:, :t])
    assert not np.allclose(before[key][:, t:], after[key][:, t:])


def test_pitch_only_model_ignores_dt_and_velocity():
  model = tiny_model("model.inputs=pitch")
  x = random_inputs(2, 6)
  a, _ = predict(model, x)
  b, _ = predict(model, dict(x, dt=x["dt"] * 3, velocity=x["velocity"] * 0))
  np.testing.assert_array_equal(a["pitch_logits"], b["pitch_logits"])


@pytest.mark.parametrize("recurrence", ["scan", "fused"])
def test_steps_one_position_at_a_time_follow_the_window_s_features(recurrence):
  """The sampler's `step` (the textbook cell at one position, the recurrent terms carried) is the LSTM that
  `features` runs over a window, for every recurrence."""
  model, x = tiny_model(f"model.recurrence={recurrence}"), random_inputs(3, 6)
  features, final = nnx.jit(lambda model: model.features(x, model.initial_state(3)))(model)

  @nnx.jit
  def stepped(model):
    state, outputs = model.initial_state(3), []
    for t in range(6):
      output, state = model.step(jax.tree.map(lambda a: a[:, t], x), state, model.recurrent_terms(state))
      outputs.append(output)
    return jnp.stack(outputs), state

  outputs, state = stepped(model)
  np.testing.assert_allclose(outputs, features, atol=1e-5)  # Both time-major [T, B, hidden].
  for got, want in zip(state, final):
    np.testing.assert_allclose(got.h, want.h, atol=1e-5)
    np.testing.assert_allclose(got.c, want.c, atol=1e-5)


def test_state_carries_across_calls_like_one_long_call():
  """The LSTM state and the pitches held at the end of the first call continue into the second."""
  model = tiny_model()
  assert model.reads_held
  x = random_inputs(2, 10)
  targets = jax.tree.map(lambda t: t[:2, :10], TARGETS)
  held = jnp.full((2, 128), -1.0).at[:, 100].set(1.5)
  whole, _ = run(model, x, None, targets, held)
  first, state = run(model, jax.tree.map(lambda a: a[:, :4], x), None, jax.tree.map(lambda a: a[:, :4], targets),
                     held)
  after_first = models.held_pitches(x["pitch"][:, :4], x["dt"][:, :4], x["velocity"][:, :4], held)[:, -1]
  second, _ = run(model, jax.tree.map(lambda a: a[:, 4:], x), state, jax.tree.map(lambda a: a[:, 4:], targets),
                  after_first)
  for key in whole:
    np.testing.assert_allclose(jnp.concatenate([first[key], second[key]], 1), whole[key], atol=1e-5)


def test_held_pitches_follow_each_pitch_latest_event_and_age_by_the_dts():
  x = random_inputs(3, 40, seed=2)
  pitch = x["pitch"] % 8  # Few pitches, so that each is struck and released many times.
  velocity = x["velocity"] * (np.random.default_rng(3).random((3, 40)) < 0.5)
  rng = np.random.default_rng(4)
  before = np.where(rng.random((3, 128)) < 0.3, rng.exponential(1.0, (3, 128)), -1.0).astype(np.float32)
  held = np.asarray(models.held_pitches(pitch, x["dt"], velocity, before))
  expected = before.astype(np.float64)
  for t in range(40):
    expected = np.where(expected >= 0, expected + np.asarray(x["dt"][:, t])[:, None], -1.0)
    expected[np.arange(3), np.asarray(pitch[:, t])] = np.where(np.asarray(velocity[:, t]) > 0, 0.0, -1.0)
    np.testing.assert_allclose(held[:, t], expected, atol=1e-5)
    np.testing.assert_array_equal(held[:, t] >= 0, expected >= 0)
  assert (held[:, :, 8:] > 1.0).any() and (held[:, :, :8] >= 0).any()
  assert (np.asarray(models.held_pitches(pitch, x["dt"], velocity))[:, :, 8:] == -1.0).all()


def test_distribution_heads_read_which_pitches_are_held_and_for_how_long():
  model = tiny_model()
  features = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)), jnp.float32)
  before = {"pitch": jnp.full((4,), 60), "velocity": jnp.full((4,), 80), "time": jnp.full((4,), 3)}
  silent = jnp.full((4, 128), -1.0)
  held = [silent.at[:, 60].set(seconds) for seconds in (0.1, 2.0)]
  for name in model.order:
    logits = [model.head_logits(name, features, before, models.read_held(h), isolate_heads=False, rngs=None)
              for h in (silent, *held)]
    assert not np.allclose(logits[0], logits[1]) and not np.allclose(logits[1], logits[2]), name


@pytest.mark.parametrize("heads", models.HEAD_MODES)
def test_first_layers_of_all_heads_at_once_give_each_head_s_outputs(heads):
  """The sampler applies every head's first layer in one matmul; each head then gives what it gives alone."""
  model = tiny_model(f"model.heads={heads}")
  features = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)), jnp.float32)
  before = {"pitch": jnp.full((4,), 60), "velocity": jnp.full((4,), 80), "time": jnp.full((4,), 3)}
  held = models.read_held(jnp.full((4, 128), -1.0).at[:, 60].set(0.5)) if model.reads_held else None
  first_layers = model.first_layers(features)
  assert sorted(first_layers) == sorted(model.order)
  for name in model.order:
    alone, together, shifted = (
        model.head_logits(name, features, before, held, isolate_heads=False, rngs=None, first_layer=f)
        for f in (None, first_layers[name], first_layers[name] + 1.0))
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(shifted, alone), name  # The head reads the first layer it is given.


def test_heads_after_the_pitch_read_whether_the_event_releases_it_and_its_age():
  """With the count of held notes by age zeroed, the velocity head (after the pitch) still changes with
  what is held at the drawn pitch, and only there."""
  model = tiny_model()
  assert model.order.index("pitch") < model.order.index("velocity")
  head = model.velocity_head
  assert head.own.kernel.shape[0] == models.AGE_POINTS and model.pitch_head.own is None
  head.census.kernel.value = jnp.zeros_like(head.census.kernel.value)
  head.own_out.kernel.value = jnp.full_like(head.own_out.kernel.value, 0.5)
  features = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64)), jnp.float32)
  before = {"pitch": jnp.asarray([60, 61]), "velocity": jnp.full((2,), 80), "time": jnp.full((2,), 3)}
  silent = jnp.full((2, 128), -1.0)
  logits = [model.head_logits("velocity", features, before, models.read_held(h), isolate_heads=False, rngs=None)
            for h in (silent, silent.at[:, 60].set(0.5), silent.at[:, 60].set(3.0))]
  assert not np.allclose(logits[0][0], logits[1][0]) and not np.allclose(logits[1][0], logits[2][0])
  np.testing.assert_array_equal(logits[0][1], logits[1][1])  # Pitch 61 drawn: 60's state is not its own.


def test_the_pitch_head_scores_a_release_by_its_note_age_and_an_onset_apart():
  """With what the first layer reads of the held pitches zeroed, the age of pitch 60's note moves pitch 60's
  logit and no other, and the logits of silent pitches are those of an empty keyboard."""
  model = tiny_model()
  head = model.pitch_head
  for projection in (head.census, head.sounding):
    projection.kernel.value = jnp.zeros_like(projection.kernel.value)
  rng = np.random.default_rng(1)
  head.release_age.kernel.value = jnp.asarray(rng.normal(size=head.release_age.kernel.shape), jnp.float32)
  features = jnp.asarray(rng.normal(size=(1, 64)), jnp.float32)
  silent = jnp.full((1, 128), -1.0)
  logits = [np.asarray(model.head_logits("pitch", features, {}, models.read_held(h), isolate_heads=False,
                                         rngs=None))[0]
            for h in (silent, silent.at[:, [60, 72]].set(0.1), silent.at[:, [60, 72]].set([5.0, 0.1]))]
  assert np.flatnonzero(logits[1] != logits[2]).tolist() == [60]
  assert np.flatnonzero(logits[0] != logits[1]).tolist() == [60, 72]


def test_age_weights_place_each_sounding_note_on_the_log_age_grid():
  held = jnp.asarray([[-1.0, 0.0, 0.004, 0.05, 1.3, 30.0, 500.0]])
  weights = np.asarray(models.age_weights(held))[0]
  np.testing.assert_array_equal(weights[0], 0.0)
  np.testing.assert_allclose(weights[1:].sum(-1), 1.0, rtol=1e-6)
  grid = np.arange(models.AGE_POINTS) * models.AGE_STEP
  log_age = np.log1p(np.asarray(held[0, 1:6]) / models.DT_INPUT_SCALE)
  np.testing.assert_allclose(weights[1:6] @ grid, log_age, rtol=1e-5)
  assert weights[6, -1] == 1.0  # Older than the grid: the last point.
  assert ((weights[1:] > 0).sum(-1) <= 2).all()


def test_held_terms_read_the_age_weights_they_never_form():
  """The census, the reading of a per-event function of the age and one pitch's weights, each by a gather or
  scatter on the two grid points around a note's age, equal the same computed from the dense weights."""
  rng = np.random.default_rng(0)
  held = jnp.asarray(np.where(rng.random((2, 3, 128)) < 0.3, rng.exponential(2.0, (2, 3, 128)), models.SILENT),
                     jnp.float32).at[0, 0, 5].set(500.0)
  weights, terms = np.asarray(models.age_weights(held)), models.read_held(held)
  np.testing.assert_array_equal(terms.sounding, held >= 0)
  np.testing.assert_allclose(terms.census, weights.sum(-2), rtol=1e-5, atol=1e-6)
  values = jnp.asarray(rng.normal(size=(2, 3, models.AGE_POINTS)), jnp.float32)
  dense_read = np.einsum("btpk,btk->btp", weights, values)
  np.testing.assert_allclose(np.where(held >= 0, terms.read_by_age(values), 0.0), dense_read, rtol=1e-5, atol=1e-6)
  pitch = jnp.asarray(rng.integers(0, 128, (2, 3)))
  np.testing.assert_allclose(terms.pitch_age(pitch), np.take_along_axis(weights, pitch[..., None, None], -2)[..., 0, :],
                             rtol=1e-6)


def test_the_window_starts_with_the_pitches_held_before_it():
  """A note held into the window changes the distribution heads' outputs; the regression heads read none."""
  x = random_inputs(2, 6)
  held = jnp.full((2, 128), -1.0).at[:, 30].set(0.5)
  for heads, reads in (("distribution", True), ("regression", False)):
    model = tiny_model(f"model.heads={heads}")
    assert model.reads_held == reads
    targets = jax.tree.map(lambda t: t[:2, :6], TARGETS)
    silent, _ = run(model, x, None, targets)
    holding, _ = run(model, x, None, targets, held)
    assert all(np.allclose(silent[key], holding[key]) != reads for key in silent), heads


def test_dropout_only_with_rngs():
  model = tiny_model("model.dropout=0.5")
  x = random_inputs(2, 5)
  a, _ = predict(model, x)
  b, _ = predict(model, x)
  c, _ = predict(model, x, rngs=nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(a["time_logits"], b["time_logits"])
  assert not np.allclose(a["time_logits"], c["time_logits"])


def test_bfloat16_compute_keeps_float32_params_and_outputs_close():
  x = random_inputs(2, 8)
  full, _ = predict(tiny_model(), x)
  half_model = tiny_model("model.dtype=bfloat16")
  half, _ = predict(half_model, x)
  assert half_model.lstm[0].recurrent_kernel.value.dtype == jnp.float32
  assert half["pitch_logits"].dtype == jnp.float32
  np.testing.assert_allclose(half["pitch_logits"], full["pitch_logits"], atol=0.1)


def test_unknown_input_mode_is_rejected():
  with pytest.raises(ValueError, match="model.inputs"):
    tiny_model("model.inputs=pitch+velocity")


def test_byte_dropout_drops_at_the_rate_and_keeps_the_mean():
  x = jnp.ones((256, 512))
  dropped = models.byte_dropout(x, 0.25, jax.random.PRNGKey(0))
  assert abs(float(jnp.mean(dropped == 0)) - 0.25) < 0.01
  assert abs(float(jnp.mean(dropped)) - 1.0) < 0.02
  np.testing.assert_array_equal(models.byte_dropout(x, 0.0, jax.random.PRNGKey(0)), x)


def test_embedded_projection_by_lookup_matches_the_concatenated_inputs():
  model = tiny_model()
  x = random_inputs(4, 50)  # 200 positions, more than the 128 embedding rows: the lookup path.
  extra = models.continuous_inputs(x["dt"], x["velocity"])
  by_lookup = lambda m: m.lstm[0].project_embedded(m.embed, x["pitch"], extra)
  by_concatenation = lambda m: m.lstm[0].project(jnp.concatenate([m.embed(x["pitch"]), extra], -1))
  np.testing.assert_allclose(by_lookup(model), by_concatenation(model), atol=1e-5)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=by_lookup(model).shape), jnp.float32)
  grads = [nnx.grad(lambda m: jnp.sum(weights * project(m)))(model) for project in (by_lookup, by_concatenation)]
  for ours, expected in zip(*(jax.tree.leaves(g) for g in grads)):
    np.testing.assert_allclose(ours, expected, atol=1e-4)
  assert np.any(jax.tree.leaves(grads[0])[0])  # The embedding's gradient, not all zero.


def test_recurrences_share_parameters_outputs_and_gradients():
  """scan and fused build the same parameter tree, and with it give the same outputs and gradients (the
  window's 200 positions take the first layer's lookup projection)."""
  scan, fused = tiny_model("model.recurrence=scan"), tiny_model("model.recurrence=fused")
  assert (scan.recurrence, fused.recurrence) == ("scan", "fused")
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(scan)), nnx.to_pure_dict(nnx.state(fused)))
  x, targets = random_inputs(4, 50), random_inputs(4, 50, seed=1)

  def loss(model: models.MusicLSTM) -> jax.Array:
    outputs, _ = model(x, targets=targets)
    return sum(jnp.sum(jnp.sin(output)) for output in outputs.values())

  gradient = nnx.jit(nnx.grad(loss))
  for ours, expected in ((run(scan, x, None, targets)[0], run(fused, x, None, targets)[0]),
                         (gradient(scan), gradient(fused))):
    # Head gradients reach several hundred here: 1e-5 relative to each array's largest entry.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max())),
                 ours, expected)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto chooses by backend; this checks the CPU's choice")
def test_auto_runs_the_fused_kernel_on_a_cpu():
  for dtype in ("float32", "bfloat16"):
    model = tiny_model(f"model.dtype={dtype}")
    assert model.recurrence == "fused" and all(layer.recurrence == "fused" for layer in model.lstm)


def test_unknown_recurrence_is_rejected():
  with pytest.raises(UserError, match="model.recurrence must be one of auto, scan, fused, cudnn, not 'cuda'"):
    tiny_model("model.recurrence=cuda")


def test_a_model_config_saved_before_recurrence_existed_runs_auto():
  model_config = load_config("tiny").model.to_dict()
  del model_config["recurrence"]
  model = models.MusicLSTM(ml_collections.ConfigDict(model_config), rngs=nnx.Rngs(params=0))
  assert model.recurrence == models.resolve_recurrence("auto", jnp.float32)


def test_window_density_is_onsets_per_second_against_the_reference():
  window = {"dt": jnp.asarray([[0.0, 0.5, 0.25, 0.75], [0.1, 0.0, 0.0, 0.0]]),
            "velocity": jnp.asarray([[80.0, 0.0, 64.0, 0.0], [0.0, 0.0, 0.0, 0.0]])}
  # Two onsets in 1.5 s; none at all reads as the lowest density of the control's range.
  np.testing.assert_allclose(models.window_density(window), np.log([2 / 1.5 / 8.0, 0.25 / 8.0]), rtol=1e-6)


def test_window_polyphony_is_the_notes_sounding_averaged_over_the_time_some_sound():
  # Onsets of 60 and 64, their releases, a silent gap of 3 s, an onset of 67: 1, 2, 1 and 0 notes sound in the
  # gaps of 1, 1, 2 and 3 s, so 5 note-seconds over 4 s with a note sounding. The second row starts with 50
  # already held (`held`), one more note in every gap: 12 note-seconds over all 7 s.
  stream = {"pitch": jnp.asarray([[60, 64, 60, 64, 67]] * 2), "dt": jnp.asarray([[0.0, 1.0, 1.0, 2.0, 3.0]] * 2),
            "velocity": jnp.asarray([[70.0, 80.0, 0.0, 0.0, 90.0]] * 2)}
  held = jnp.full((2, 128), models.SILENT).at[1, 50].set(0.5)
  inputs, targets = ({k: v[:, :-1] for k, v in stream.items()}, {k: v[:, 1:] for k, v in stream.items()})
  np.testing.assert_allclose(models.window_polyphony(inputs, targets, held),
                             np.log([5 / 4 / models.POLYPHONY_REFERENCE, 12 / 7 / models.POLYPHONY_REFERENCE]),
                             rtol=1e-6)
  silent = {"pitch": jnp.asarray([[60, 60]]), "dt": jnp.asarray([[1.0, 1.0]]), "velocity": jnp.asarray([[0.0, 0.0]])}
  np.testing.assert_allclose(models.window_polyphony(silent, silent),
                             np.log(models.POLYPHONY_RANGE[0] / models.POLYPHONY_REFERENCE), rtol=1e-6)


@pytest.mark.parametrize("condition", models.CONDITIONS[1:])
def test_a_conditioned_model_reads_the_window_s_controls_unless_given_others_in_every_head(condition):
  model = tiny_model(f"model.condition={condition}")
  plain = tiny_model()
  names = condition.split("+")
  assert model.conditioned and not plain.conditioned and model.controls == tuple(names)
  assert model.lstm[0].input_proj.kernel.shape[0] == plain.lstm[0].input_proj.kernel.shape[0] + len(names)
  x = random_inputs(3, 12)
  held = jnp.full((3, 128), models.SILENT).at[:, 40].set(1.0)
  own, _ = run(model, x, None, TARGETS, held=held)
  window = {name: jnp.broadcast_to(value[:, None], (3, 12))
            for name, value in models.window_controls(model.controls, x, TARGETS, held).items()}
  completed = model.with_controls(x, TARGETS, held)
  assert set(completed) == set(x) | set(names) and plain.with_controls(x, TARGETS, held) is x
  for name in completed:
    np.testing.assert_array_equal(completed[name], dict(x, **window)[name])
  given, _ = run(model, dict(x, **window), None, TARGETS, held=held)
  for key in own:
    np.testing.assert_array_equal(own[key], given[key])
  for name in names:
    other, _ = run(model, dict(x, **{**window, name: window[name] + 0.5}), None, TARGETS, held=held)
    for key in own:
      assert not np.allclose(own[key], other[key]), (name, key)
  # Each head reads each control itself, not only through the LSTM's features (which strict isolation keeps
  # from the time and velocity heads' losses).
  features, held_terms = jnp.zeros((3, 64)), models.read_held(jnp.full((3, 128), models.SILENT))
  before = {"pitch": jnp.asarray([60, 61, 62]), "velocity": jnp.asarray([0, 80, 100]), "time": jnp.asarray([0, 5, 9])}
  for head in model.order:
    for name in names:
      at = lambda value: model.head_logits(head, features, before, held_terms, isolate_heads=False, rngs=None,
                                           controls={other: jnp.full((3,), value if other == name else 0.0)
                                                     for other in names})
      assert not np.allclose(at(0.0), at(1.0)), (head, name)


def test_a_conditioned_model_needs_a_density_or_the_targets():
  with pytest.raises(ValueError, match="density"):
    tiny_model("model.condition=density", "model.heads=regression")(random_inputs(2, 5))
