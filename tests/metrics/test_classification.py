"""Tests of mcu.metrics.classification: closed forms, references, properties, edge cases, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import softmax

from mcu.errors import InputError
from mcu.metrics import (
    classification_summary,
    confidence,
    expected_entropy,
    margin,
    max_probability,
    mean_probabilities,
    mutual_information,
    predictive_entropy,
    predictive_variance,
    variation_ratio,
)

PER_EXAMPLE = (predictive_entropy, expected_entropy, mutual_information, variation_ratio, margin, max_probability)
ENTROPIC = (predictive_entropy, expected_entropy, mutual_information)


def dirichlet_samples(rng: np.random.Generator, t: int, n: int, c: int, alpha: float = 1.0) -> np.ndarray:
    return rng.dirichlet(np.full(c, alpha), size=(t, n))


# ------------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("c", [2, 3, 10])
def test_uniform_samples_have_entropy_log_c_and_no_epistemic_part(c: int) -> None:
    s = np.full((5, 3, c), 1.0 / c)
    np.testing.assert_allclose(predictive_entropy(s), np.log(c), rtol=1e-12)
    np.testing.assert_allclose(expected_entropy(s), np.log(c), rtol=1e-12)
    np.testing.assert_allclose(mutual_information(s), 0.0, atol=1e-12)
    np.testing.assert_allclose(predictive_entropy(s, base=c), 1.0, rtol=1e-12)
    np.testing.assert_allclose(max_probability(s), 1.0 / c)
    np.testing.assert_allclose(margin(s), 0.0, atol=1e-15)
    np.testing.assert_array_equal(variation_ratio(s), 0.0)  # ties go to class 0 every time


def test_identical_one_hot_samples_are_certain() -> None:
    s = np.tile(np.eye(3)[[0, 2, 1]], (4, 1, 1))  # T=4, N=3, C=3, same one-hot in every sample
    for fn in (predictive_entropy, expected_entropy, mutual_information, variation_ratio):
        np.testing.assert_array_equal(fn(s), 0.0)
    np.testing.assert_array_equal(margin(s), 1.0)
    np.testing.assert_array_equal(max_probability(s), 1.0)
    np.testing.assert_array_equal(predictive_variance(s), 0.0)


def test_confident_disagreement_is_all_epistemic() -> None:
    s = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(predictive_entropy(s), np.log(2))
    np.testing.assert_array_equal(expected_entropy(s), 0.0)
    np.testing.assert_allclose(mutual_information(s, base=2), 1.0)
    np.testing.assert_array_equal(variation_ratio(s), 0.5)
    np.testing.assert_array_equal(predictive_variance(s), [[0.25, 0.25]])


def test_identical_samples_have_zero_mutual_information(rng: np.random.Generator) -> None:
    one = dirichlet_samples(rng, 1, 6, 4)
    s = np.repeat(one, 7, axis=0)
    np.testing.assert_allclose(mutual_information(s), 0.0, atol=1e-12)
    np.testing.assert_allclose(expected_entropy(s), predictive_entropy(s), atol=1e-12)


def test_confidence_is_max_probability(rng: np.random.Generator) -> None:
    s = dirichlet_samples(rng, 4, 5, 3)
    np.testing.assert_array_equal(confidence(s), max_probability(s))


def test_variation_ratio_counts_the_modal_label_and_breaks_ties_low() -> None:
    s = np.array(
        [
            [[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]],
            [[0.2, 0.8, 0.0], [0.1, 0.2, 0.7]],
            [[0.2, 0.8, 0.0], [0.7, 0.2, 0.1]],
        ]
    )
    # example 0: labels 0 (tie -> lowest), 1, 1 -> 1 - 2/3; example 1: labels 2, 2, 0 -> 1 - 2/3
    np.testing.assert_allclose(variation_ratio(s), [1 / 3, 1 / 3])


def test_margin_is_top_two_difference(rng: np.random.Generator) -> None:
    s = dirichlet_samples(rng, 6, 8, 5)
    top = np.sort(s.mean(axis=0), axis=-1)
    np.testing.assert_allclose(margin(s), top[:, -1] - top[:, -2], rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("base", [None, 2, 10])
def test_entropies_match_scipy(rng: np.random.Generator, base: float | None) -> None:
    s = dirichlet_samples(rng, 20, 30, 7, alpha=0.3)
    mean = s.mean(axis=0)
    np.testing.assert_allclose(
        predictive_entropy(s, base=base), scipy.stats.entropy(mean, base=base, axis=-1), rtol=0, atol=1e-12
    )
    expected = scipy.stats.entropy(s, base=base, axis=-1).mean(axis=0)
    np.testing.assert_allclose(expected_entropy(s, base=base), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        mutual_information(s, base=base), scipy.stats.entropy(mean, base=base, axis=-1) - expected, rtol=0, atol=1e-12
    )


def test_mean_and_variance_match_numpy(rng: np.random.Generator) -> None:
    s = dirichlet_samples(rng, 9, 4, 3)
    np.testing.assert_allclose(mean_probabilities(s), s.mean(axis=0), atol=1e-15)
    np.testing.assert_allclose(predictive_variance(s), s.var(axis=0, ddof=0), atol=1e-15)


def test_summary_equals_the_individual_functions(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(11, 6, 4)) * 3
    summary = classification_summary(logits, from_logits=True, base=2)
    assert summary["n_samples"] == 11
    for fn in PER_EXAMPLE:
        kwargs = {"base": 2} if fn in ENTROPIC else {}
        np.testing.assert_allclose(summary[fn.__name__], fn(logits, from_logits=True, **kwargs), atol=1e-12)
    np.testing.assert_allclose(summary["mean_probabilities"], mean_probabilities(logits, from_logits=True))
    np.testing.assert_allclose(
        summary["predictive_variance"], predictive_variance(logits, from_logits=True), atol=1e-15
    )


# ------------------------------------------------------------------------------------------ logits


def test_huge_logits_are_stable() -> None:
    logits = np.array(
        [
            [[1e4, -1e4, 0.0], [1e4, 1e4, -1e4]],
            [[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]],
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pe = predictive_entropy(logits, from_logits=True)
        ee = expected_entropy(logits, from_logits=True)
        mi = mutual_information(logits, from_logits=True)
    np.testing.assert_allclose(pe, [0.0, -(0.25 * np.log(0.25) * 2 + 0.5 * np.log(0.5))], atol=1e-12)
    np.testing.assert_allclose(ee, [0.0, np.log(2)], atol=1e-12)
    np.testing.assert_allclose(mi, pe - ee, atol=1e-12)


def test_logits_equal_softmax_probabilities(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(7, 5, 6)) * 4
    probs = softmax(logits, axis=-1)
    for fn in (*PER_EXAMPLE, mean_probabilities, predictive_variance):
        np.testing.assert_allclose(fn(logits, from_logits=True), fn(probs), atol=1e-10, err_msg=fn.__name__)


# ------------------------------------------------------------------------------------------ properties

shapes = st.tuples(st.integers(1, 6), st.integers(0, 4), st.integers(1, 6))
logit_arrays = shapes.flatmap(
    lambda shape: hnp.arrays(np.float64, shape, elements=st.floats(-40, 40, allow_nan=False, width=64))
)


@settings(max_examples=60, deadline=None)
@given(logit_arrays)
def test_entropy_ordering_property(logits: np.ndarray) -> None:
    probs = softmax(logits, axis=-1)
    c = logits.shape[-1]
    pe, ee, mi = predictive_entropy(probs), expected_entropy(probs), mutual_information(probs)
    tol = 1e-9
    assert np.all(mi >= 0)
    assert np.all(mi <= pe + tol)
    assert np.all(ee <= pe + tol)
    assert np.all(ee >= -tol)
    assert np.all(pe <= np.log(c) + tol)
    vr = variation_ratio(probs)
    assert np.all((vr >= 0) & (vr <= 1 - 1 / c + tol))
    assert np.all((margin(probs) >= 0) & (margin(probs) <= 1 + tol))
    assert np.all(predictive_variance(probs) <= 0.25 + tol)


@settings(max_examples=60, deadline=None)
@given(logit_arrays)
def test_logits_and_softmax_agree_property(logits: np.ndarray) -> None:
    probs = softmax(logits, axis=-1)
    for fn in (*ENTROPIC, margin, max_probability):
        np.testing.assert_allclose(fn(logits, from_logits=True), fn(probs), atol=1e-9, err_msg=fn.__name__)


# ------------------------------------------------------------------------------------------ edge cases


def test_exact_zeros_give_no_nan_and_no_warning() -> None:
    s = np.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = classification_summary(s)
    for key, value in summary.items():
        assert np.all(np.isfinite(value)), key
    np.testing.assert_allclose(summary["predictive_entropy"], np.log(2))


def test_single_sample_has_zero_mutual_information(rng: np.random.Generator) -> None:
    for s, from_logits in ((dirichlet_samples(rng, 1, 5, 3), False), (rng.normal(size=(1, 5, 3)), True)):
        np.testing.assert_allclose(mutual_information(s, from_logits=from_logits), 0.0, atol=1e-12)
        np.testing.assert_array_equal(variation_ratio(s, from_logits=from_logits), 0.0)
        np.testing.assert_array_equal(predictive_variance(s, from_logits=from_logits), 0.0)


@pytest.mark.parametrize("from_logits", [False, True])
def test_single_class(from_logits: bool) -> None:
    s = np.full((3, 2, 1), 5.0 if from_logits else 1.0)
    kw = {"from_logits": from_logits}
    for fn in (predictive_entropy, expected_entropy, mutual_information, variation_ratio):
        np.testing.assert_array_equal(fn(s, **kw), [0.0, 0.0])
    np.testing.assert_array_equal(margin(s, **kw), [1.0, 1.0])  # second-best class counts as probability 0
    np.testing.assert_array_equal(max_probability(s, **kw), [1.0, 1.0])


def test_two_classes(rng: np.random.Generator) -> None:
    p = rng.uniform(size=(8, 4))
    s = np.stack([p, 1 - p], axis=-1)
    mean = p.mean(axis=0)
    np.testing.assert_allclose(margin(s), np.abs(2 * mean - 1), atol=1e-12)
    binary_entropy = -(mean * np.log(mean) + (1 - mean) * np.log(1 - mean))
    np.testing.assert_allclose(predictive_entropy(s), binary_entropy, atol=1e-12)


@pytest.mark.parametrize("from_logits", [False, True])
def test_no_examples_gives_empty_results(from_logits: bool) -> None:
    s = np.zeros((4, 0, 3))
    for fn in PER_EXAMPLE:
        assert fn(s, from_logits=from_logits).shape == (0,), fn.__name__
    assert mean_probabilities(s, from_logits=from_logits).shape == (0, 3)
    assert predictive_variance(s, from_logits=from_logits).shape == (0, 3)
    assert classification_summary(s, from_logits=from_logits)["margin"].shape == (0,)


def test_float32_probabilities_with_many_classes_are_accepted(rng: np.random.Generator) -> None:
    probs = softmax(rng.normal(size=(3, 4, 1000)).astype(np.float32), axis=-1).astype(np.float32)
    assert predictive_entropy(probs).dtype == np.float64
    np.testing.assert_allclose(predictive_entropy(probs), predictive_entropy(probs.astype(np.float64)))


def test_probabilities_are_not_renormalised() -> None:
    s = np.array([[[0.5, 0.50005]]])  # sums to 1 + 5e-5: inside the tolerance, used as given
    np.testing.assert_array_equal(mean_probabilities(s), s[0])


def test_integer_one_hot_input_is_accepted() -> None:
    s = np.array([[[1, 0]], [[0, 1]]])
    np.testing.assert_allclose(mutual_information(s), np.log(2))


# ------------------------------------------------------------------------------------------ errors


def test_wrong_rank_names_the_argument_and_the_shape() -> None:
    with pytest.raises(InputError, match=r"samples: expected a 3-D array \(T, N, C\), got shape \(4, 5\)"):
        predictive_entropy(np.full((4, 5), 0.2))


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float, from_logits: bool) -> None:
    s = np.full((2, 3, 2), 0.5)
    s[1, 2, 0] = bad
    with pytest.raises(InputError, match=r"samples: expected finite values, got 1 non-finite value\(s\)"):
        mutual_information(s, from_logits=from_logits)


def test_logits_passed_as_probabilities_are_rejected() -> None:
    with pytest.raises(InputError, match=r"samples: expected probabilities in \[0, 1\].*from_logits=True"):
        predictive_entropy(np.array([[[2.0, -1.0]]]))
    with pytest.raises(InputError, match=r"samples: expected rows .* summing to 1"):
        predictive_entropy(np.array([[[0.2, 0.3]]]))


def test_empty_sample_or_class_axis_is_rejected() -> None:
    with pytest.raises(InputError, match="samples: expected at least one entry along axis 0"):
        predictive_entropy(np.zeros((0, 2, 3)))
    with pytest.raises(InputError, match="samples: expected at least one entry along axis 2"):
        margin(np.zeros((2, 2, 0)), from_logits=True)


@pytest.mark.parametrize("base", [0, 1, -2, "e", np.inf, True])
def test_bad_base_is_rejected(base: object) -> None:
    with pytest.raises(InputError, match="base: expected"):
        predictive_entropy(np.full((1, 1, 2), 0.5), base=base)


def test_bad_from_logits_and_dtype_are_rejected() -> None:
    with pytest.raises(InputError, match="from_logits: expected True or False, got 'yes'"):
        predictive_entropy(np.full((1, 1, 2), 0.5), from_logits="yes")
    with pytest.raises(InputError, match="samples: expected an array of real numbers, got dtype"):
        predictive_entropy(np.array([[["a", "b"]]]))


def test_input_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        variation_ratio(np.ones((2, 2)))
