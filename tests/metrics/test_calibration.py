"""Tests of mcu.metrics.calibration against closed forms, loops written from the definitions, and sklearn."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from mcu.errors import InputError
from mcu.metrics import (
    ReliabilityDiagram,
    aupr,
    aurc,
    auroc,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_diagram,
    risk_coverage_curve,
)


def random_probs(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    probs = rng.dirichlet(np.full(c, 0.5), size=n)
    labels = np.array([rng.choice(c, p=p) for p in probs])  # calibrated by construction
    return probs, labels


# ------------------------------------------------------------------------------------------ ECE


def ece_loop(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """The textbook definition, one bin at a time: bins (lo, hi], the first one closed at 0."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
def test_ece_matches_the_definition(rng: np.random.Generator, n_bins: int) -> None:
    probs, labels = random_probs(rng, 400, 4)
    labels[:100] = 0  # make it miscalibrated too
    reference = ece_loop(probs, labels, n_bins)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(reference, abs=1e-12)


def test_reliability_diagram_fields() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    diagram = reliability_diagram(probs, [0, 1, 0, 0], n_bins=5)
    np.testing.assert_allclose(diagram.bin_edges, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_array_equal(diagram.counts, [0, 0, 2, 0, 2])  # 0.6 is in (0.4, 0.6]
    np.testing.assert_allclose(diagram.accuracy[[2, 4]], [0.5, 0.5])
    np.testing.assert_allclose(diagram.confidence[[2, 4]], [0.6, 0.9])
    assert np.isnan(diagram.accuracy[[0, 1, 3]]).all() and np.isnan(diagram.confidence[0])
    assert diagram.ece == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)


def test_perfect_predictions_have_zero_ece() -> None:
    assert expected_calibration_error(np.eye(4), [0, 1, 2, 3]) == 0.0


def test_plot_reliability_diagram_draws_bars() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diagram = reliability_diagram(np.array([[0.9, 0.1], [0.3, 0.7]]), [0, 0], n_bins=4)
    ax = plot_reliability_diagram(diagram)
    assert len(ax.patches) == 4
    assert "ECE" in ax.get_title()
    _, own_ax = plt.subplots()
    assert plot_reliability_diagram(diagram, ax=own_ax) is own_ax
    plt.close("all")
    with pytest.raises(InputError, match="diagram: expected a ReliabilityDiagram"):
        plot_reliability_diagram({"ece": 0.1})


def test_importing_metrics_imports_no_plotting_or_framework() -> None:
    code = (
        "import sys, mcu.metrics; "
        "print(sorted(m for m in ('matplotlib', 'torch', 'tensorflow', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------ Brier, NLL


def test_brier_matches_sklearn(rng: np.random.Generator) -> None:
    p = rng.uniform(size=200)
    y = (rng.uniform(size=200) < p).astype(int)
    binary = np.stack([1 - p, p], axis=1)
    assert brier_score(binary, y) == pytest.approx(2 * brier_score_loss(y, p), abs=1e-12)
    probs, labels = random_probs(rng, 150, 5)
    reference = brier_score_loss(labels, probs, labels=np.arange(5), scale_by_half=False)
    assert brier_score(probs, labels) == pytest.approx(reference, abs=1e-12)


def test_brier_closed_form() -> None:
    assert brier_score(np.eye(3), [0, 1, 2]) == 0.0
    assert brier_score(np.eye(3), [1, 2, 0]) == 2.0


def test_nll_matches_sklearn(rng: np.random.Generator) -> None:
    probs, labels = random_probs(rng, 300, 4)
    probs = 0.98 * probs + 0.005  # no zeros, so sklearn's clipping never acts
    reference = log_loss(labels, probs, labels=np.arange(4))
    assert negative_log_likelihood(probs, labels) == pytest.approx(reference, abs=1e-9)


def test_nll_of_a_zero_probability_is_exactly_inf_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert negative_log_likelihood(np.array([[1.0, 0.0], [0.5, 0.5]]), [1, 0]) == np.inf
        assert negative_log_likelihood(np.array([[1.0, 0.0]]), [0]) == 0.0


# ------------------------------------------------------------------------------------------ AUROC, AUPR


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tied", [False, True])
def test_auroc_and_aupr_match_sklearn(seed: int, tied: bool) -> None:
    rng = np.random.default_rng(seed)
    n_pos, n_neg = rng.integers(1, 60, size=2)
    pos, neg = rng.normal(0.7, 1.0, size=n_pos), rng.normal(0.0, 1.0, size=n_neg)
    if tied:
        pos, neg = np.round(pos), np.round(neg)  # many ties within and across groups
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    scores = np.r_[pos, neg]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, scores), abs=1e-6)
    assert aupr(pos, neg) == pytest.approx(average_precision_score(y, scores), abs=1e-6)


def test_auroc_aupr_closed_forms() -> None:
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    assert aupr([1.0, 1.0], [1.0, 1.0]) == 0.5  # one threshold: precision 1/2 at recall 1
    assert aupr([5.0], [1.0, 2.0, 3.0]) == 1.0


# ------------------------------------------------------------------------------------------ risk-coverage


def test_risk_coverage_closed_form() -> None:
    coverage, risk = risk_coverage_curve([0.4, 0.1, 0.3, 0.2], [False, True, True, True])
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.0, 0.0, 0.25])
    assert aurc([0.4, 0.1, 0.3, 0.2], [False, True, True, True]) == pytest.approx(0.25 / 4)


def test_risk_coverage_ties_are_accepted_together() -> None:
    a = risk_coverage_curve([0.1, 0.5, 0.5, 0.9], [1, 0, 1, 1])
    b = risk_coverage_curve([0.1, 0.5, 0.5, 0.9], [1, 1, 0, 1])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(a[0], [0.25, 0.75, 1.0])
    np.testing.assert_allclose(a[1], [0.0, 1 / 3, 0.25])


def test_aurc_without_ties_is_the_mean_selective_risk(rng: np.random.Generator) -> None:
    uncertainty = rng.normal(size=300)
    correct = rng.uniform(size=300) < 0.8
    ordered = correct[np.argsort(uncertainty)]
    selective_risk = np.cumsum(~ordered) / np.arange(1, 301)
    assert aurc(uncertainty, correct) == pytest.approx(selective_risk.mean(), abs=1e-12)
    # a perfect ranking puts every error last; its AURC is the smallest possible
    perfect = np.where(correct, 0.0, 1.0) + rng.uniform(0, 0.1, size=300)
    assert aurc(perfect, correct) < aurc(uncertainty, correct)


# ------------------------------------------------------------------------------------------ errors


def test_probability_and_label_errors() -> None:
    with pytest.raises(InputError, match=r"probs: expected a 2-D array \(N, C\), got shape \(2, 2, 2\)"):
        brier_score(np.full((2, 2, 2), 0.5), [0, 1])
    with pytest.raises(InputError, match=r"labels: expected labels in \[0, 2\), got label 2"):
        negative_log_likelihood(np.full((2, 2), 0.5), [0, 2])
    with pytest.raises(InputError, match="labels: expected integer class labels, got dtype float64"):
        expected_calibration_error(np.full((2, 2), 0.5), [0.0, 1.0])
    with pytest.raises(InputError, match="labels: expected 2 labels"):
        expected_calibration_error(np.full((2, 2), 0.5), [0, 1, 1])
    with pytest.raises(InputError, match="probs: expected at least one example"):
        brier_score(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(InputError, match="probs: expected rows"):
        brier_score(np.array([[0.2, 0.2]]), [0])
    with pytest.raises(InputError, match=r"n_bins: expected an integer in \[1, 1048576\], got 0"):
        reliability_diagram(np.eye(2), [0, 1], n_bins=0)


def test_bool_labels_are_read_as_classes() -> None:
    assert brier_score(np.eye(2), np.array([False, True])) == 0.0


def test_score_errors() -> None:
    with pytest.raises(InputError, match="scores_neg: expected at least one score"):
        auroc([1.0], [])
    with pytest.raises(InputError, match=r"scores_pos: expected a 1-D array \(n,\)"):
        aupr([[1.0]], [0.0])
    with pytest.raises(InputError, match="scores_pos: expected finite values"):
        auroc([np.nan], [0.0])
    with pytest.raises(InputError, match=r"correct: expected shape \(2,\)"):
        aurc([0.1, 0.2], [True])
    with pytest.raises(InputError, match="correct: expected booleans or 0/1 values"):
        risk_coverage_curve([0.1, 0.2], [0.5, 1.0])


def test_reliability_diagram_is_a_frozen_dataclass() -> None:
    diagram = reliability_diagram(np.eye(2), [0, 1])
    assert isinstance(diagram, ReliabilityDiagram)
    with pytest.raises(AttributeError):
        diagram.ece = 1.0  # type: ignore[misc]
