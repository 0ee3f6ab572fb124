"""The classes of the distribution heads and the likelihoods on them: proper, exact, and on one scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicgen_jax import distributions
from musicgen_jax.config import load_config

BINS = distributions.time_bins(load_config("default").model)


def test_default_time_classes_are_zero_then_10_ms_bins_up_to_4_s():
  assert BINS == distributions.TimeBins(0.01, 401)
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
