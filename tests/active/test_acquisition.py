"""Acquisition heuristics: closed forms, the higher-is-more-uncertain convention, BatchBALD diversity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import entr, softmax

from mcu.active import acquisition
from mcu.active.acquisition import HEURISTICS, SCORES, bald, batch_bald, get_heuristic
from mcu.errors import InputError

POINTWISE = sorted(set(SCORES) - {"random"})


def _brute_force_batch_value(probs: np.ndarray, batch: list[int]) -> float:
    """BatchBALD value by enumerating all C^|batch| joint labels."""
    t = probs.shape[0]
    joint = np.ones((t, 1))
    for i in batch:
        joint = (joint[:, :, None] * probs[:, i][:, None, :]).reshape(t, -1)
    expected = sum(entr(probs[:, i]).sum(-1).mean() for i in batch)
    return float(entr(joint.mean(0)).sum() - expected)


def _duplicates_example() -> np.ndarray:
    """Examples a, an exact copy of a, and b (less informative than a but independent of it)."""
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    return np.stack([a, a, b], axis=1)  # (T=4, N=3, C=2)


@pytest.mark.parametrize("name", ["bald", "variation_ratio"])
def test_identical_samples_carry_no_epistemic_uncertainty(name):
    identical = np.tile(np.array([[[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]]), (6, 1, 1))  # (T=6, N=2, C=3)
    np.testing.assert_allclose(HEURISTICS[name](identical, from_logits=False), 0.0, atol=1e-12)


def test_closed_forms_on_uniform_and_disagreeing_samples():
    uniform = np.full((3, 2, 4), 0.25)
    np.testing.assert_allclose(acquisition.entropy(uniform, from_logits=False), np.log(4))
    np.testing.assert_allclose(acquisition.margin(uniform, from_logits=False), 1.0)
    np.testing.assert_allclose(acquisition.least_confidence(uniform, from_logits=False), 0.75)
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(bald(disagree, from_logits=False), np.log(2))
    np.testing.assert_allclose(acquisition.variation_ratio(disagree, from_logits=False), 0.5)


@pytest.mark.parametrize("name", POINTWISE)
def test_confident_example_scores_lower_than_uncertain_one(name):
    rng = np.random.default_rng(0)
    confident = np.tile([0.97, 0.02, 0.01], (20, 1))
    uncertain = rng.dirichlet([1.0, 1.0, 1.0], size=20)
    samples = np.stack([confident, uncertain], axis=1)
    scores = HEURISTICS[name](samples, from_logits=False)
    assert scores.shape == (2,)
    assert scores[1] > scores[0]


@pytest.mark.parametrize("name", POINTWISE)
def test_logits_and_their_softmax_give_the_same_scores(name):
    logits = np.random.default_rng(1).normal(size=(8, 5, 3)) * 3
    np.testing.assert_allclose(
        HEURISTICS[name](logits, from_logits=True),
        HEURISTICS[name](softmax(logits, axis=-1), from_logits=False),
        atol=1e-12,
    )


def test_random_is_seeded_and_uniform():
    samples = np.zeros((2, 1000, 3))
    a = acquisition.random(samples, seed=3)
    np.testing.assert_array_equal(a, acquisition.random(samples, seed=3))
    assert not np.array_equal(a, acquisition.random(samples, seed=4))
    assert a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.05


def test_registry_names_and_unknown_name():
    assert set(HEURISTICS) == {
        "bald", "batchbald", "entropy", "least_confidence", "margin", "random", "variation_ratio"
    }
    assert get_heuristic("batchbald") is batch_bald
    with pytest.raises(InputError, match="heuristic.*'bold'.*bald, batchbald, entropy"):
        get_heuristic("bold")


def test_probabilities_passed_as_logits_flag_mismatch_is_rejected():
    with pytest.raises(InputError, match="from_logits=True"):
        bald(np.full((2, 1, 2), 3.0), from_logits=False)


def test_batch_bald_skips_the_duplicate_that_top_k_bald_picks():
    samples = _duplicates_example()
    scores = bald(samples, from_logits=False)
    assert np.argsort(-scores, kind="stable")[:2].tolist() == [0, 1]  # top-2 BALD: a and its copy
    indices, gains = batch_bald(samples, 2, from_logits=False)
    assert indices.tolist() == [0, 2]
    np.testing.assert_allclose(gains[0], np.log(2))
    np.testing.assert_allclose(gains[1], scores[2])  # b is independent of a: its full BALD score remains


def test_batch_bald_on_a_copy_gains_nothing():
    indices, gains = batch_bald(_duplicates_example(), 3, from_logits=False)
    assert indices.tolist() == [0, 2, 1]
    np.testing.assert_allclose(gains[2], 0.0, atol=1e-12)


def test_batch_bald_exact_regime_matches_brute_force_greedy():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.full(3, 0.5), size=(8, 12))
    indices, gains = batch_bald(probs, 4, from_logits=False)
    chosen: list[int] = []
    for _ in range(4):
        values = {i: _brute_force_batch_value(probs, chosen + [i]) for i in range(12) if i not in chosen}
        chosen.append(max(values, key=lambda i: (values[i], -i)))
    assert indices.tolist() == chosen
    np.testing.assert_allclose(np.cumsum(gains), [_brute_force_batch_value(probs, chosen[: j + 1]) for j in range(4)])
    assert np.all(np.diff(gains) <= 1e-12)  # submodular: gains do not increase
    np.testing.assert_allclose(gains[0], bald(probs, from_logits=False).max())


def test_batch_bald_switches_to_seeded_sampling_past_the_configuration_cap():
    probs = np.random.default_rng(3).dirichlet(np.full(4, 0.5), size=(10, 30))
    exact_idx, exact_gains = batch_bald(probs, 5, from_logits=False)  # 4^4 = 256 configurations: exact
    # cap 10: the 4 configurations after the first pick are exact, the 16 after the second are sampled
    idx_a, gains_a = batch_bald(probs, 5, from_logits=False, max_configurations=10, seed=0)
    idx_b, gains_b = batch_bald(probs, 5, from_logits=False, max_configurations=10, seed=0)
    np.testing.assert_array_equal(idx_a, idx_b)
    np.testing.assert_array_equal(gains_a, gains_b)
    assert idx_a[:2].tolist() == exact_idx[:2].tolist()
    np.testing.assert_allclose(gains_a[:2], exact_gains[:2])
    _, gains_c = batch_bald(probs, 5, from_logits=False, max_configurations=10, seed=1)
    assert not np.array_equal(gains_a[2:], gains_c[2:])


def test_batch_bald_sampled_estimate_is_close_to_the_exact_value():
    probs = np.random.default_rng(4).dirichlet(np.full(10, 0.3), size=(10, 20))
    # 10^4 configurations exceed the cap of 2000 at the fifth pick: 2000 sampled configurations
    indices, gains = batch_bald(probs, 5, from_logits=False, max_configurations=2000, seed=0)
    exact = _brute_force_batch_value(probs, list(indices))
    assert np.cumsum(gains)[-1] == pytest.approx(exact, rel=0.03)


def test_batch_bald_chunking_does_not_change_the_answer(monkeypatch):
    probs = np.random.default_rng(5).dirichlet(np.ones(3), size=(6, 40))
    expected = batch_bald(probs, 5, from_logits=False)
    monkeypatch.setattr(acquisition, "_MAX_CELLS", 7)
    got = batch_bald(probs, 5, from_logits=False)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1])


def test_batch_bald_accepts_logits():
    logits = np.random.default_rng(6).normal(size=(5, 9, 3))
    a = batch_bald(logits, 3, from_logits=True)
    b = batch_bald(softmax(logits, axis=-1), 3, from_logits=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-12)


@pytest.mark.parametrize("k", [0, 4, 2.0, True])
def test_batch_bald_rejects_a_bad_k(k):
    with pytest.raises(InputError, match="k: expected an integer in \\[1, 3\\]"):
        batch_bald(_duplicates_example(), k, from_logits=False)
