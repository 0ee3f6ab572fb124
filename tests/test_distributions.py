"""The classes of the distribution heads and the likelihoods on them: proper, exact, and on one scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicgen_jax import distributions
from musicgen_jax.config import load_config

BINS = distributions.time_bins(load_config("default").model)


def test_default_time_classes_are_zero_then_10_ms_bins_up_to_4_s():
  assert BINS == distributions.TimeBins(0.01, 401, mixture=0)
  assert BINS.outputs == 401
  assert BINS.max_dt == pytest.approx(4.0)
  dt = jnp.asarray([0.0, 1e-6, 0.004, 0.0101, 0.5, 3.999, 4.0, 7.5])
  np.testing.assert_array_equal(distributions.time_class(dt, BINS), [0, 1, 1, 2, 50, 400, 400, 400])


def test_a_drawn_dt_lies_in_its_class():
  classes = jnp.repeat(jnp.arange(BINS.count), 5)
  uniform = jax.random.uniform(jax.random.key(0), classes.shape)
  uniform = uniform.at[::5].set(0.0).at[1::5].set(np.nextafter(np.float32(1.0), np.float32(0.0)))  # The edges.
  dt = distributions.dt_of_class(classes, uniform, BINS)
  np.testing.assert_array_equal(distributions.time_class(dt, BINS), classes)
  assert float(dt.max()) <= BINS.max_dt + 1e-6
  np.testing.assert_array_equal(dt[classes == 0], 0.0)


def test_velocity_classes_round_into_0_to_127():
  np.testing.assert_array_equal(distributions.velocity_class(jnp.asarray([0.0, 0.4, 1.0, 63.6, 127.0, 130.0])),
                                [0, 0, 1, 64, 127, 127])


@pytest.mark.parametrize("location, scale", [(0.0, 0.05), (0.003, 0.001), (0.4, 0.2), (3.98, 0.5), (-1.0, 0.01)])
def test_laplace_time_masses_sum_to_one_over_the_classes(location, scale):
  classes = jnp.arange(BINS.count)
  nll = distributions.laplace_time_nll(jnp.full(classes.shape, location), classes, jnp.float32(scale), BINS)
  assert np.all(np.isfinite(nll))
  assert float(jnp.sum(jnp.exp(-nll))) == pytest.approx(1.0, abs=1e-5)


def test_laplace_time_mass_of_an_interval_matches_the_cdf():
  cdf = lambda x, mu, b: np.where(x < mu, 0.5 * np.exp((x - mu) / b), 1 - 0.5 * np.exp(-(x - mu) / b))
  mu, b = 0.13, 0.04
  nll = distributions.laplace_time_nll(jnp.float32(mu), jnp.int32(15), jnp.float32(b), BINS)
  assert float(np.exp(-nll)) == pytest.approx(cdf(0.15, mu, b) - cdf(0.14, mu, b), rel=1e-4)
  zero = distributions.laplace_time_nll(jnp.float32(mu), jnp.int32(0), jnp.float32(b), BINS)
  assert float(np.exp(-zero)) == pytest.approx(cdf(0.0, mu, b), rel=1e-4)  # Censored: all mass below 0.


@pytest.mark.parametrize("mean, sigma", [(0.0, 10.0), (64.0, 3.0), (64.3, 0.2), (126.0, 30.0), (300.0, 5.0)])
def test_gaussian_velocity_masses_sum_to_one_over_the_classes(mean, sigma):
  classes = jnp.arange(distributions.NUM_VELOCITIES)
  nll = distributions.gaussian_velocity_nll(jnp.full(classes.shape, mean), classes, jnp.float32(sigma))
  assert np.all(np.isfinite(nll))
  assert float(jnp.sum(jnp.exp(-nll))) == pytest.approx(1.0, abs=1e-5)


def test_class_nll_is_the_categorical_log_likelihood():
  logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.25]]))
  np.testing.assert_allclose(distributions.class_nll(logits, jnp.asarray([1])), [np.log(4.0)], rtol=1e-6)


MIXTURE = BINS._replace(mixture=3)


def mixture_outputs(zero_logit, weights, locations, scales):
  """Time head outputs of a mixture from its dt = 0 logit, weight logits, locations (log s) and scales."""
  return jnp.asarray([zero_logit, *weights, *locations, *(-np.log(scales))], jnp.float32)


@pytest.mark.parametrize("outputs", [
    mixture_outputs(0.0, [0.0, 0.0, 0.0], [-3.0, -1.0, 0.5], [0.5, 0.3, 1.0]),
    mixture_outputs(-3.0, [2.0, -1.0, 0.0], [np.log(0.0003), np.log(0.25), np.log(40.0)], [0.01, 0.001, 0.2]),
    mixture_outputs(4.0, [0.0, 9.0, -9.0], [-20.0, np.log(3.995), 8.0], [0.0009, 50.0, 0.01]),
])
def test_mixture_time_masses_sum_to_one_over_the_classes_with_finite_gradients(outputs):
  assert MIXTURE.outputs == 10
  classes = jnp.arange(MIXTURE.count)
  total = lambda o: jnp.sum(jnp.exp(-distributions.time_nll(jnp.broadcast_to(o, (MIXTURE.count, 10)), classes,
                                                               MIXTURE)))
  assert float(total(outputs)) == pytest.approx(1.0, abs=1e-5)
  nll_sum = lambda o: jnp.sum(distributions.time_nll(jnp.broadcast_to(o, (MIXTURE.count, 10)), classes, MIXTURE))
  assert np.all(np.isfinite(jax.grad(nll_sum)(outputs)))


def test_mixture_time_mass_of_a_bin_matches_the_logistic_cdf():
  zero_logit, weights, locations, scales = 0.3, np.array([0.2, -0.5, 1.0]), np.log([0.02, 0.13, 1.5]), [0.4, 0.2, 0.7]
  outputs = mixture_outputs(zero_logit, weights, locations, scales)
  cdf = lambda dt: np.sum(np.exp(weights) / np.exp(weights).sum() / (1 + np.exp(-(np.log(dt) - locations) / scales)))
  nonzero = 1 / (1 + np.exp(zero_logit))
  mass = lambda k: float(np.exp(-distributions.time_nll(outputs, jnp.int32(k), MIXTURE)))
  assert mass(0) == pytest.approx(1 - nonzero, rel=1e-5)
  assert mass(15) == pytest.approx(nonzero * (cdf(0.15) - cdf(0.14)), rel=1e-4)
  assert mass(1) == pytest.approx(nonzero * cdf(0.01), rel=1e-4)  # The first bin holds every dt down to 0.
  assert mass(400) == pytest.approx(nonzero * (1 - cdf(3.99)), rel=1e-4)  # The last holds every longer gap.


def test_temperature_one_leaves_the_time_outputs_and_others_sharpen_them():
  outputs = mixture_outputs(0.5, [0.0, 1.0, -1.0], [-3.0, -1.0, 0.5], [0.5, 0.3, 1.0])
  np.testing.assert_allclose(distributions.temper_time(outputs, jnp.float32(1.0), MIXTURE), outputs, rtol=1e-6)
  np.testing.assert_allclose(distributions.temper_time(outputs[:5], jnp.float32(0.5), BINS), outputs[:5] * 2.0)
  cool = distributions.mixture_parameters(distributions.temper_time(outputs, jnp.float32(0.5), MIXTURE))
  warm = distributions.mixture_parameters(outputs)
  np.testing.assert_allclose(cool[0], 2.0 * warm[0])
  np.testing.assert_allclose(cool[1], 2.0 * warm[1])
  np.testing.assert_allclose(cool[2], warm[2])
  np.testing.assert_allclose(cool[3], 2.0 * warm[3], rtol=1e-6)  # Inverse scales: the logistics half as wide.
