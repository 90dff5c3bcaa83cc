"""Tests of mcu.metrics.streaming: chunked accumulation equals the dense functions on all the samples."""

from __future__ import annotations

import numpy as np
import pytest

from mcu.errors import InputError
from mcu.metrics import (
    ClassificationAccumulator,
    RegressionAccumulator,
    aleatoric_variance,
    classification_summary,
    epistemic_std,
    epistemic_variance,
    mc_standard_errors,
    predictive_mean,
    predictive_mean_standard_error,
    total_std,
    total_variance,
)

T = 23
CHUNKINGS = {
    "one chunk": [T],
    "single samples": [1] * T,
    "even": [5, 5, 5, 5, 3],
    "lopsided": [1, 22],
    "random": list(np.diff(np.r_[0, np.sort(np.random.default_rng(3).choice(np.arange(1, T), 6, replace=False)), T])),
}
ENTROPY_SE = ("predictive_entropy", "expected_entropy", "mutual_information")


def split(samples: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    assert sum(sizes) == samples.shape[0]
    return np.split(samples, np.cumsum(sizes)[:-1], axis=0)


def assert_same(streamed: dict, dense: dict, atol: float = 1e-10) -> None:
    assert streamed.keys() == dense.keys()
    for key in dense:
        np.testing.assert_allclose(streamed[key], dense[key], rtol=0, atol=atol, err_msg=key)


def classification_inputs(rng: np.random.Generator, from_logits: bool) -> np.ndarray:
    logits = rng.normal(size=(T, 7, 5)) * rng.uniform(0.2, 6.0, size=(1, 7, 1))
    logits[:, 0] = [10.0, -10.0, 0.0, 0.0, 0.0]  # an example on which every sample agrees
    if from_logits:
        return logits
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------ classification


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("base", [None, 2])
def test_classification_streaming_equals_dense(
    rng: np.random.Generator, chunking: str, from_logits: bool, base: float | None
) -> None:
    samples = classification_inputs(rng, from_logits)
    acc = ClassificationAccumulator(from_logits=from_logits, base=base)
    for chunk in split(samples, CHUNKINGS[chunking]):
        acc.update(chunk)
    assert_same(acc.result(), classification_summary(samples, from_logits=from_logits, base=base))
    assert acc.n_samples == T


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("exact", [False, True])
def test_classification_standard_errors_equal_dense(rng: np.random.Generator, chunking: str, exact: bool) -> None:
    samples = classification_inputs(rng, from_logits=True)
    acc = ClassificationAccumulator(from_logits=True, base=2, exact_standard_errors=exact)
    for chunk in split(samples, CHUNKINGS[chunking]):
        acc.update(chunk)
    dense = mc_standard_errors(samples, from_logits=True, base=2, method="delta" if exact else "bound")
    for name in ENTROPY_SE:
        np.testing.assert_allclose(acc.standard_error(name), dense[name], rtol=1e-8, atol=1e-10, err_msg=name)
    probs = classification_summary(samples, from_logits=True)["mean_probabilities"]
    expected = np.exp(samples - samples.max(-1, keepdims=True))
    expected = (expected / expected.sum(-1, keepdims=True)).std(axis=0, ddof=1) / np.sqrt(T)
    assert probs.shape == expected.shape
    np.testing.assert_allclose(acc.standard_error("mean_probabilities"), expected, atol=1e-12)


def test_bound_standard_errors_are_conservative(rng: np.random.Generator) -> None:
    samples = classification_inputs(rng, from_logits=True)
    exact, bound = (ClassificationAccumulator(True, exact_standard_errors=e) for e in (True, False))
    for acc in (exact, bound):
        for chunk in split(samples, CHUNKINGS["even"]):
            acc.update(chunk)
    for name in ENTROPY_SE:
        assert np.all(bound.standard_error(name) >= exact.standard_error(name) - 1e-12), name


def test_classification_state_does_not_grow_with_samples(rng: np.random.Generator) -> None:
    acc = ClassificationAccumulator(from_logits=True)

    def state_bytes() -> int:
        arrays = [v for v in vars(acc._moments).values() if isinstance(v, np.ndarray)] + [acc._counts]
        return sum(a.nbytes for a in arrays)

    acc.update(rng.normal(size=(4, 6, 3)))
    first = state_bytes()
    for _ in range(20):
        acc.update(rng.normal(size=(4, 6, 3)))
    assert state_bytes() == first
    assert acc.n_samples == 84


def test_single_sample_stream(rng: np.random.Generator) -> None:
    acc = ClassificationAccumulator(from_logits=True)
    acc.update(rng.normal(size=(1, 4, 3)))
    result = acc.result()
    np.testing.assert_allclose(result["mutual_information"], 0.0, atol=1e-12)
    np.testing.assert_array_equal(result["predictive_variance"], 0.0)
    for name in (*ENTROPY_SE, "mean_probabilities"):
        assert np.isnan(acc.standard_error(name)).all()
    assert acc.standard_error("mean_probabilities").shape == (4, 3)


def test_empty_batch_stream() -> None:
    acc = ClassificationAccumulator(from_logits=False)
    acc.update(np.zeros((2, 0, 3)))
    acc.update(np.zeros((3, 0, 3)))
    result = acc.result()
    assert result["predictive_entropy"].shape == (0,) and result["mean_probabilities"].shape == (0, 3)
    assert acc.standard_error("mutual_information").shape == (0,)


def test_classification_accumulator_errors(rng: np.random.Generator) -> None:
    acc = ClassificationAccumulator(from_logits=True)
    with pytest.raises(InputError, match=r"ClassificationAccumulator: expected at least one update\(chunk\)"):
        acc.result()
    with pytest.raises(InputError, match=r"chunk: expected a 3-D array \(T, N, C\), got shape \(4, 3\)"):
        acc.update(np.zeros((4, 3)))
    acc.update(rng.normal(size=(2, 5, 3)))
    expected = r"chunk: expected \(t, N, C\) with the per-sample shape \(5, 3\) of the first chunk, got \(4, 3\)"
    with pytest.raises(InputError, match=expected):
        acc.update(rng.normal(size=(2, 4, 3)))
    with pytest.raises(InputError, match="chunk: expected finite values"):
        acc.update(np.full((1, 5, 3), np.nan))
    with pytest.raises(InputError, match="name: expected one of"):
        acc.standard_error("margin")
    with pytest.raises(InputError, match="chunk: expected probabilities in"):
        ClassificationAccumulator(from_logits=False).update(rng.normal(size=(2, 5, 3)))
    with pytest.raises(InputError, match="from_logits: expected True or False"):
        ClassificationAccumulator(from_logits=None)
    with pytest.raises(InputError, match="base: expected"):
        ClassificationAccumulator(from_logits=True, base=1)
    assert acc.n_samples == 2  # failed updates leave the state alone


# ------------------------------------------------------------------------------------------ regression


def dense_regression(samples: np.ndarray, **noise) -> dict:
    return {
        "predictive_mean": predictive_mean(samples),
        "epistemic_variance": epistemic_variance(samples),
        "epistemic_std": epistemic_std(samples),
        "aleatoric_variance": aleatoric_variance(samples, **noise),
        "total_variance": total_variance(samples, **noise),
        "total_std": total_std(samples, **noise),
        "n_samples": samples.shape[0],
    }


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("noise_var", [None, 0.25, np.array([0.1, 0.2, 0.3])])
def test_regression_streaming_equals_dense(rng: np.random.Generator, chunking: str, noise_var) -> None:
    samples = rng.normal(size=(T, 4, 3)) * 2.0 + 5.0
    acc = RegressionAccumulator(noise_var=noise_var)
    for chunk in split(samples, CHUNKINGS[chunking]):
        acc.update(chunk)
    assert_same(acc.result(), dense_regression(samples, noise_var=noise_var))
    np.testing.assert_allclose(acc.standard_error(), predictive_mean_standard_error(samples), atol=1e-12)


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_heteroscedastic_streaming_equals_dense(rng: np.random.Generator, chunking: str) -> None:
    means, log_var = rng.normal(size=(T, 6)), rng.normal(size=(T, 6))
    acc = RegressionAccumulator(heteroscedastic=True)
    for chunk in split(np.stack([means, log_var], axis=-1), CHUNKINGS[chunking]):  # (t, N, 2)
        acc.update(chunk)
    assert_same(acc.result(), dense_regression(means, log_var_samples=log_var))


def test_welford_is_stable_for_a_large_offset(rng: np.random.Generator) -> None:
    samples = 1e8 + 1e-3 * rng.normal(size=(1000, 3))
    acc = RegressionAccumulator()
    for chunk in split(samples, [1] * 500 + [100] * 5):
        acc.update(chunk)
    # The naive E[x^2] - E[x]^2 would be pure noise here (eps * 1e16 = 2 >> 1e-6). Chan's update loses only
    # the rounding of the running mean (ulp(1e8) = 1.5e-8, i.e. 1.5e-5 of a standard deviation).
    np.testing.assert_allclose(acc.result()["epistemic_variance"], samples.var(axis=0), rtol=1e-4)


def test_regression_single_sample_and_errors(rng: np.random.Generator) -> None:
    acc = RegressionAccumulator()
    with pytest.raises(InputError, match=r"RegressionAccumulator: expected at least one update\(chunk\)"):
        acc.standard_error()
    acc.update(np.ones((1, 3)))
    assert np.isnan(acc.standard_error()).all()
    np.testing.assert_array_equal(acc.result()["epistemic_variance"], 0.0)
    with pytest.raises(InputError, match=r"chunk: expected \(t, N, ...\) with the per-sample shape \(3,\)"):
        acc.update(np.ones((1, 4)))
    with pytest.raises(InputError, match="name: expected 'predictive_mean'"):
        acc.standard_error("total_variance")
    with pytest.raises(InputError, match=r"chunk: expected \(t, N, ..., 2\) with the last axis \[mean, log_var\]"):
        RegressionAccumulator(heteroscedastic=True).update(np.zeros((2, 5, 3)))
    with pytest.raises(InputError, match="noise_var: expected None with heteroscedastic=True"):
        RegressionAccumulator(heteroscedastic=True, noise_var=1.0)
    with pytest.raises(InputError, match="noise_var: expected non-negative variances"):
        RegressionAccumulator(noise_var=-0.5)
    with pytest.raises(InputError, match=r"noise_var: expected a scalar or an array broadcastable to \(5,\)"):
        RegressionAccumulator(noise_var=np.ones(2)).update(np.zeros((2, 5)))
    with pytest.raises(InputError, match="heteroscedastic: expected True or False"):
        RegressionAccumulator(heteroscedastic="yes")
