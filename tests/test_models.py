"""The model: output shapes, causality, both input modes, bfloat16 compute, and the recurrence choices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from musicgen_jax import models
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


@pytest.mark.parametrize("inputs", models.INPUT_MODES)
def test_output_shapes(inputs):
  model = tiny_model(f"model.inputs={inputs}", "model.layers=3")
  outputs, state = model(random_inputs(3, 7))
  assert outputs["pitch_logits"].shape == (3, 7, 128)
  assert outputs["dt"].shape == (3, 7)
  assert outputs["velocity"].shape == (3, 7)
  assert len(state) == 3 and state[0].h.shape == (3, 64)


def test_head_widths_follow_the_original():
  model = tiny_model("model.hidden=128")
  assert [layer.kernel.value.shape for layer in model.pitch_head.hidden] == [(128, 64), (64, 32)]
  assert model.time_head.out.kernel.value.shape == (32, 1)


@pytest.mark.parametrize("inputs", models.INPUT_MODES)
def test_causal_outputs_before_a_change_are_unchanged(inputs):
  model = tiny_model(f"model.inputs={inputs}")
  x = random_inputs(2, 12)
  t = 5
  changed = dict(x, pitch=x["pitch"].at[:, t].set((x["pitch"][:, t] + 1) % 128),
                 dt=x["dt"].at[:, t].add(0.5), velocity=x["velocity"].at[:, t].set(0.0))
  before, _ = model(x)
  after, _ = model(changed)
  for key in before:
    np.testing.assert_array_equal(before[key][:, :t], after[key][:, :t])
    assert not np.allclose(before[key][:, t:], after[key][:, t:])


def test_pitch_only_model_ignores_dt_and_velocity():
  model = tiny_model("model.inputs=pitch")
  x = random_inputs(2, 6)
  a, _ = model(x)
  b, _ = model(dict(x, dt=x["dt"] * 3, velocity=x["velocity"] * 0))
  np.testing.assert_array_equal(a["pitch_logits"], b["pitch_logits"])


def test_state_carries_across_calls_like_one_long_call():
  model = tiny_model()
  x = random_inputs(2, 10)
  whole, _ = model(x)
  first, state = model(jax.tree.map(lambda a: a[:, :4], x))
  second, _ = model(jax.tree.map(lambda a: a[:, 4:], x), state)
  np.testing.assert_allclose(jnp.concatenate([first["pitch_logits"], second["pitch_logits"]], 1),
                             whole["pitch_logits"], atol=1e-5)


def test_dropout_only_with_rngs():
  model = tiny_model("model.dropout=0.5")
  x = random_inputs(2, 5)
  a, _ = model(x)
  b, _ = model(x)
  c, _ = model(x, rngs=nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(a["dt"], b["dt"])
  assert not np.allclose(a["dt"], c["dt"])


def test_bfloat16_compute_keeps_float32_params_and_outputs_close():
  x = random_inputs(2, 8)
  full, _ = tiny_model()(x)
  half_model = tiny_model("model.dtype=bfloat16")
  half, _ = half_model(x)
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
  x = random_inputs(4, 50)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50, 128)), jnp.float32)

  def loss(model: models.MusicLSTM) -> jax.Array:
    outputs, _ = model(x)
    return jnp.sum(weights * outputs["pitch_logits"]) + jnp.sum(outputs["dt"])

  for ours, expected in ((scan(x)[0], fused(x)[0]), (nnx.grad(loss)(scan), nnx.grad(loss)(fused))):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), ours, expected)


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
