"""Tests of mcu.metrics.convergence: convergence curves, the sufficient-T rule, Monte Carlo standard errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from mcu.errors import InputError
from mcu.metrics import (
    DEFAULT_TS,
    ConvergenceCurve,
    convergence_curve,
    epistemic_std,
    mc_standard_errors,
    mutual_information,
    predictive_entropy,
    smallest_sufficient_t,
)

METRICS = ("predictive_entropy", "expected_entropy", "mutual_information")


def posterior_samples(rng: np.random.Generator, t: int, n: int = 3) -> np.ndarray:
    """Samples from a fixed per-example 'posterior' over probability vectors, well away from uniform."""
    alphas = np.array([[8.0, 3.0, 1.0], [2.0, 2.0, 6.0], [20.0, 1.0, 1.0]])[:n]
    return np.stack([rng.dirichlet(a, size=t) for a in alphas], axis=1)  # (t, n, 3)


# ------------------------------------------------------------------------------------------ curves


def test_constant_statistic_converges_at_once() -> None:
    curve = convergence_curve(np.ones((4, 3)), ts=(2, 4), statistic=lambda s: s.mean())
    np.testing.assert_array_equal(curve.ts, [2, 4])
    np.testing.assert_array_equal(curve.estimates, [1.0, 1.0])
    np.testing.assert_array_equal(curve.standard_errors, [0.0, 0.0])
    assert smallest_sufficient_t(curve, tol=1e-9) == 2


def test_estimates_use_the_first_t_samples(rng: np.random.Generator) -> None:
    s = rng.normal(size=(50, 4))
    curve = convergence_curve(s, ts=(5, 20, 50), statistic=lambda x: epistemic_std(x).mean(), n_bootstrap=10)
    for t, estimate in zip(curve.ts, curve.estimates, strict=True):
        assert estimate == pytest.approx(s[:t].std(axis=0).mean())


def test_bootstrap_standard_error_of_a_mean_matches_the_analytic_one(rng: np.random.Generator) -> None:
    s = rng.normal(size=(200, 1))
    curve = convergence_curve(s, ts=(20, 200), statistic=lambda x: x.mean(), n_bootstrap=2000, seed=1)
    for t, se in zip(curve.ts, curve.standard_errors, strict=True):
        # the bootstrap SE of a mean is sd(ddof=0) / sqrt(t); 2000 replicates estimate it within ~1.6 %
        assert se == pytest.approx(s[:t].std() / np.sqrt(t), rel=0.08)


def test_curve_is_reproducible_with_a_seed(rng: np.random.Generator) -> None:
    s = posterior_samples(rng, 30)

    def stat(x: np.ndarray) -> np.ndarray:
        return predictive_entropy(x).mean()

    a = convergence_curve(s, ts=(10, 30), statistic=stat, n_bootstrap=20, seed=7)
    b = convergence_curve(s, ts=(10, 30), statistic=stat, n_bootstrap=20, seed=7)
    c = convergence_curve(s, ts=(10, 30), statistic=stat, n_bootstrap=20, seed=8)
    np.testing.assert_array_equal(a.standard_errors, b.standard_errors)
    assert not np.array_equal(a.standard_errors, c.standard_errors)


def test_array_statistics_and_default_ts(rng: np.random.Generator) -> None:
    s = posterior_samples(rng, 60)
    curve = convergence_curve(s, statistic=mutual_information, n_bootstrap=5)
    np.testing.assert_array_equal(curve.ts, [t for t in DEFAULT_TS if t <= 60])
    assert curve.estimates.shape == curve.standard_errors.shape == (3, 3)


def test_standard_error_shrinks_and_sufficient_t_is_found(rng: np.random.Generator) -> None:
    s = posterior_samples(rng, 200)
    curve = convergence_curve(s, statistic=lambda x: predictive_entropy(x).mean(), n_bootstrap=100, seed=0)
    np.testing.assert_array_equal(curve.ts, DEFAULT_TS)
    assert curve.standard_errors[-1] < curve.standard_errors[0] / 2  # ~1/sqrt(t): 20x more samples
    t = smallest_sufficient_t(curve, tol=float(curve.standard_errors[2]) * 1.0001)
    assert t is not None and t <= 50
    assert smallest_sufficient_t(curve, tol=1e-12) is None


def test_smallest_sufficient_t_uses_every_element() -> None:
    errors = np.array([[0.3, 0.1], [0.1, 0.2], [0.05, 0.05]])
    curve = ConvergenceCurve(np.array([10, 20, 50]), np.zeros((3, 2)), errors, 100, 0)
    assert smallest_sufficient_t(curve, tol=0.2) == 20
    assert smallest_sufficient_t(curve, tol=0.1) == 50


def test_curve_errors(rng: np.random.Generator) -> None:
    s = rng.normal(size=(30, 2))

    def stat(x: np.ndarray) -> float:
        return float(x.mean())

    with pytest.raises(InputError, match=r"ts: expected sample counts <= T=30 .*got 50"):
        convergence_curve(s, ts=(10, 50), statistic=stat)
    with pytest.raises(InputError, match="ts: expected a non-empty, strictly increasing sequence"):
        convergence_curve(s, ts=(20, 10), statistic=stat)
    with pytest.raises(InputError, match="ts: expected an integer >= 2, got 1"):
        convergence_curve(s, ts=(1, 10), statistic=stat)
    with pytest.raises(InputError, match=r"ts: expected an integer >= 2, got 2\.5"):
        convergence_curve(s, ts=(2.5,), statistic=stat)
    with pytest.raises(InputError, match="samples: expected at least 10 samples for the default ts"):
        convergence_curve(s[:5], statistic=stat)
    with pytest.raises(InputError, match="statistic: expected a function"):
        convergence_curve(s, ts=(10,), statistic="mean")
    with pytest.raises(InputError, match="n_bootstrap: expected an integer >= 2"):
        convergence_curve(s, ts=(10,), statistic=stat, n_bootstrap=1)
    curve = convergence_curve(s, ts=(10,), statistic=stat, n_bootstrap=2)
    with pytest.raises(InputError, match="tol: expected a positive number"):
        smallest_sufficient_t(curve, tol=0)
    with pytest.raises(InputError, match="curve: expected a ConvergenceCurve"):
        smallest_sufficient_t({"ts": [1]}, tol=0.1)


# ------------------------------------------------------------------------------------------ standard errors


@pytest.mark.parametrize("method", ["delta", "bound"])
def test_identical_samples_have_zero_standard_error(rng: np.random.Generator, method: str) -> None:
    s = np.repeat(posterior_samples(rng, 1), 5, axis=0)
    for name, value in mc_standard_errors(s, method=method).items():
        np.testing.assert_allclose(value, 0.0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("method", ["delta", "bound"])
def test_one_sample_gives_nan(rng: np.random.Generator, method: str) -> None:
    errors = mc_standard_errors(posterior_samples(rng, 1), method=method)
    assert set(errors) == set(METRICS)
    for value in errors.values():
        assert value.shape == (3,) and np.isnan(value).all()


@pytest.mark.parametrize("method", ["delta", "bound"])
def test_expected_entropy_standard_error_is_exact(rng: np.random.Generator, method: str) -> None:
    s = posterior_samples(rng, 40)
    per_sample = scipy.stats.entropy(s, axis=-1)
    expected = per_sample.std(axis=0, ddof=1) / np.sqrt(40)
    np.testing.assert_allclose(mc_standard_errors(s, method=method)["expected_entropy"], expected, atol=1e-12)
    np.testing.assert_allclose(
        mc_standard_errors(s, method=method, base=2)["expected_entropy"], expected / np.log(2), atol=1e-12
    )


def test_bound_is_never_below_delta(rng: np.random.Generator) -> None:
    for t in (2, 5, 50):
        logits = rng.normal(size=(t, 20, 6)) * rng.uniform(0.1, 5, size=(1, 20, 1))
        delta = mc_standard_errors(logits, from_logits=True)
        bound = mc_standard_errors(logits, from_logits=True, method="bound")
        for name in METRICS:
            assert np.all(bound[name] >= delta[name] - 1e-12), name


def test_delta_standard_errors_match_the_spread_between_runs() -> None:
    rng = np.random.default_rng(2024)
    t, repeats = 50, 400
    runs = [posterior_samples(rng, t) for _ in range(repeats)]
    spread_pe = np.std([predictive_entropy(r) for r in runs], axis=0, ddof=1)
    spread_mi = np.std([mutual_information(r) for r in runs], axis=0, ddof=1)
    errors = [mc_standard_errors(r) for r in runs]
    mean_se_pe = np.mean([e["predictive_entropy"] for e in errors], axis=0)
    mean_se_mi = np.mean([e["mutual_information"] for e in errors], axis=0)
    # 400 runs estimate a standard deviation within ~3.5 % (1/sqrt(2*400)); the first-order delta method
    # at T=50 adds a few percent of bias. 15 % is > 3 sigma of the estimation noise.
    np.testing.assert_allclose(mean_se_pe, spread_pe, rtol=0.15)
    np.testing.assert_allclose(mean_se_mi, spread_mi, rtol=0.15)


def test_standard_error_errors() -> None:
    with pytest.raises(InputError, match="method: expected one of"):
        mc_standard_errors(np.full((2, 1, 2), 0.5), method="bootstrap")
    with pytest.raises(InputError, match=r"samples: expected a 3-D array \(T, N, C\)"):
        mc_standard_errors(np.full((2, 2), 0.5))
