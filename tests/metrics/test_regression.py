"""Tests of mcu.metrics.regression: moments, intervals, split-conformal recalibration, coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from mcu.errors import InputError
from mcu.metrics import (
    ConformalIntervalCalibrator,
    aleatoric_variance,
    conformal_interval,
    conformal_scale,
    epistemic_std,
    epistemic_variance,
    gaussian_interval,
    interval_coverage,
    mean_interval_width,
    predictive_mean,
    predictive_mean_standard_error,
    quantile_interval,
    total_std,
    total_variance,
)

# ------------------------------------------------------------------------------------------ moments


def test_mean_and_population_variance(rng: np.random.Generator) -> None:
    s = rng.normal(size=(12, 5, 3))
    np.testing.assert_allclose(predictive_mean(s), s.mean(axis=0))
    np.testing.assert_allclose(epistemic_variance(s), s.var(axis=0, ddof=0))
    np.testing.assert_allclose(epistemic_std(s), s.std(axis=0, ddof=0))
    assert predictive_mean(s).shape == (5, 3)


def test_single_sample_has_zero_epistemic_variance_and_undefined_standard_error() -> None:
    s = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(epistemic_variance(s), 0.0)
    assert np.isnan(predictive_mean_standard_error(s)).all()


def test_standard_error_of_the_mean(rng: np.random.Generator) -> None:
    s = rng.normal(size=(20, 4))
    np.testing.assert_allclose(predictive_mean_standard_error(s), s.std(axis=0, ddof=1) / np.sqrt(20))


def test_no_examples_gives_empty_results() -> None:
    s = np.zeros((3, 0))
    assert predictive_mean(s).shape == (0,)
    assert total_variance(s, noise_var=1.0).shape == (0,)
    assert gaussian_interval(s)[0].shape == (0,)


def test_homoscedastic_total_variance_scalar_and_broadcast(rng: np.random.Generator) -> None:
    s = rng.normal(size=(10, 4, 2))
    np.testing.assert_allclose(total_variance(s, noise_var=0.3), s.var(axis=0) + 0.3)
    per_output = np.array([0.1, 2.0])
    np.testing.assert_allclose(total_variance(s, noise_var=per_output), s.var(axis=0) + per_output)
    np.testing.assert_allclose(total_std(s, noise_var=0.3), np.sqrt(s.var(axis=0) + 0.3))
    np.testing.assert_array_equal(total_variance(s), epistemic_variance(s))


def test_heteroscedastic_total_variance_is_the_mixture_variance(rng: np.random.Generator) -> None:
    means = rng.normal(size=(6, 3))
    log_var = rng.normal(size=(6, 3))
    expected = np.exp(log_var).mean(axis=0) + means.var(axis=0)
    np.testing.assert_allclose(total_variance(means, log_var_samples=log_var), expected)
    np.testing.assert_allclose(aleatoric_variance(means, log_var_samples=log_var), np.exp(log_var).mean(axis=0))
    # the variance of the equal-weight Gaussian mixture, by direct integration of its second moment
    second_moment = (np.exp(log_var) + means**2).mean(axis=0)
    np.testing.assert_allclose(expected, second_moment - means.mean(axis=0) ** 2, rtol=1e-12)


# ------------------------------------------------------------------------------------------ intervals


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_gaussian_interval_matches_scipy(rng: np.random.Generator, level: float) -> None:
    s = rng.normal(size=(15, 7))
    lower, upper = gaussian_interval(s, level, noise_var=0.2)
    ref_lo, ref_hi = norm.interval(level, loc=s.mean(axis=0), scale=np.sqrt(s.var(axis=0) + 0.2))
    np.testing.assert_allclose(lower, ref_lo, rtol=1e-12)
    np.testing.assert_allclose(upper, ref_hi, rtol=1e-12)


def test_quantile_interval_matches_numpy(rng: np.random.Generator) -> None:
    s = rng.normal(size=(50, 4, 2))
    lower, upper = quantile_interval(s, level=0.8)
    np.testing.assert_allclose(lower, np.quantile(s, 0.1, axis=0))
    np.testing.assert_allclose(upper, np.quantile(s, 0.9, axis=0))


def test_coverage_and_width_closed_form() -> None:
    y = np.array([0.0, 1.0, 2.0, 3.0])
    lower, upper = np.array([-1.0, 1.0, 2.5, 0.0]), np.array([1.0, 2.0, 3.0, 3.0])
    assert interval_coverage(y, lower, upper) == 0.75  # closed ends count as inside
    assert mean_interval_width(lower, upper) == (2.0 + 1.0 + 0.5 + 3.0) / 4


# ------------------------------------------------------------------------------------------ conformal


def test_conformal_scale_uses_the_finite_sample_quantile() -> None:
    scores = np.arange(1.0, 20.0)  # n = 19, level 0.95 -> k = ceil(20 * 0.95) = 19: the largest score
    assert conformal_scale(np.zeros(19), 1.0, scores, level=0.95) == 19.0
    assert conformal_scale(np.zeros(9), 1.0, np.arange(1.0, 10.0), level=0.9) == 9.0  # 10 * 0.9 in binary > 9
    assert conformal_scale(np.zeros(9), 2.0, -np.arange(1.0, 10.0), level=0.5) == 2.5  # |y - mean| / std
    with pytest.raises(InputError, match=r"y: expected at least 19 calibration points for level=0\.95, got 18"):
        conformal_scale(np.zeros(18), 1.0, np.arange(18.0), level=0.95)


@pytest.mark.parametrize("n", [20, 99, 500])
@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_conformal_rank_formula(n: int, level: float) -> None:
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))
    k = math.ceil(round((n + 1) * level, 9))
    assert conformal_scale(np.zeros(n), 1.0, scores, level) == float(k)


def test_conformal_recalibration_restores_coverage(rng: np.random.Generator) -> None:
    # The model reports std 1 but the noise has sd 2: the Gaussian 90 % interval covers only ~59 %.
    n_cal, n_test, level = 999, 20_000, 0.9
    mean = rng.normal(size=n_cal + n_test)
    y = mean + 2.0 * rng.normal(size=mean.size)
    std = np.ones_like(mean)
    naive = interval_coverage(y[n_cal:], *conformal_interval(mean[n_cal:], std[n_cal:], norm.ppf(0.95)))
    assert naive < 0.65
    cal = ConformalIntervalCalibrator(level).fit(mean[:n_cal], std[:n_cal], y[:n_cal])
    coverage = interval_coverage(y[n_cal:], *cal.interval(mean[n_cal:], std[n_cal:]))
    # Coverage given the calibration set is Beta-distributed with sd ~ sqrt(0.9 * 0.1 / 1000) = 0.0095;
    # test noise adds 0.002. The band is about +-3.5 sd around the guarantee (>= 0.9, <= 0.9 + 1/1000).
    assert 0.865 <= coverage <= 0.935
    assert abs(cal.scale_ - 2.0 * norm.ppf(0.95)) < 0.35
    assert cal.n_calibration_ == n_cal


def test_calibrator_from_samples_is_the_same_as_from_moments(rng: np.random.Generator) -> None:
    samples = rng.normal(size=(30, 40)) + rng.normal(size=40)
    y = rng.normal(size=40)
    a = ConformalIntervalCalibrator(0.8).fit_samples(samples, y, noise_var=0.5)
    b = ConformalIntervalCalibrator(0.8).fit(predictive_mean(samples), total_std(samples, noise_var=0.5), y)
    assert a.scale_ == b.scale_
    lo_a, hi_a = a.interval_samples(samples, noise_var=0.5)
    lo_b, hi_b = b.interval(predictive_mean(samples), total_std(samples, noise_var=0.5))
    np.testing.assert_array_equal(lo_a, lo_b)
    np.testing.assert_array_equal(hi_a, hi_b)
    assert "scale_=" in repr(a)


def test_calibrator_handles_multi_output_targets(rng: np.random.Generator) -> None:
    mean, y = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
    cal = ConformalIntervalCalibrator(0.9).fit(mean, np.array([1.0, 2.0]), y)
    assert cal.n_calibration_ == 100
    lower, upper = cal.interval(mean, np.array([1.0, 2.0]))
    assert lower.shape == (50, 2) and np.all(upper >= lower)


# ------------------------------------------------------------------------------------------ errors


def test_sample_errors() -> None:
    expected = r"samples: expected an array of at least 2 dimensions \(T, N, \.\.\.\), got shape \(5,\)"
    with pytest.raises(InputError, match=expected):
        predictive_mean(np.zeros(5))
    with pytest.raises(InputError, match="samples: expected finite values"):
        epistemic_variance(np.array([[1.0, np.nan]]))
    with pytest.raises(InputError, match="samples: expected at least one entry along axis 0"):
        epistemic_std(np.zeros((0, 3)))


def test_noise_errors(rng: np.random.Generator) -> None:
    s = rng.normal(size=(4, 3))
    with pytest.raises(InputError, match="noise_var: expected None when log_var_samples is given"):
        total_variance(s, noise_var=1.0, log_var_samples=np.zeros_like(s))
    with pytest.raises(InputError, match="noise_var: expected non-negative variances"):
        total_variance(s, noise_var=-1.0)
    with pytest.raises(InputError, match=r"noise_var: expected a scalar or an array broadcastable to \(3,\)"):
        total_variance(s, noise_var=np.ones(2))
    expected = r"log_var_samples: expected the shape of samples \(4, 3\), got shape \(4, 2\)"
    with pytest.raises(InputError, match=expected):
        total_variance(s, log_var_samples=np.zeros((4, 2)))
    with pytest.raises(InputError, match="log_var_samples: expected finite values"):
        gaussian_interval(s, log_var_samples=np.full((4, 3), np.inf))


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1, True, "0.9", None])
def test_level_errors(level: object) -> None:
    with pytest.raises(InputError, match="level: expected a number strictly between 0 and 1"):
        quantile_interval(np.zeros((3, 2)), level)
    with pytest.raises(InputError, match="level: expected"):
        ConformalIntervalCalibrator(level)


def test_interval_and_conformal_errors() -> None:
    with pytest.raises(InputError, match="upper: expected upper >= lower everywhere"):
        interval_coverage([0.0], [1.0], [0.0])
    with pytest.raises(InputError, match=r"y: expected the shape of lower \(2,\), got shape \(3,\)"):
        interval_coverage([0.0, 1.0, 2.0], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(InputError, match="y: expected at least one target"):
        interval_coverage([], [], [])
    with pytest.raises(InputError, match="lower: expected at least one interval"):
        mean_interval_width([], [])
    with pytest.raises(InputError, match="std: expected strictly positive values"):
        conformal_scale(np.zeros(30), np.zeros(30), np.ones(30))
    with pytest.raises(InputError, match=r"y: expected the shape of mean \(30,\), got shape \(29,\)"):
        conformal_scale(np.zeros(30), 1.0, np.ones(29))
    with pytest.raises(InputError, match="scale: expected a finite non-negative number"):
        conformal_interval([0.0], 1.0, -1.0)
    with pytest.raises(InputError, match=r"expected fit\(...\) before interval"):
        ConformalIntervalCalibrator().interval([0.0], 1.0)
