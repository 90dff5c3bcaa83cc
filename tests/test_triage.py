"""Triage: routing by thresholds, fitting them to operational targets, and the per-tier report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mcu.errors import InputError
from mcu.metrics.calibration import risk_coverage_curve
from mcu.triage import DEFAULT_TIERS, Triage, fit_thresholds


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uncertainties in [0, 1) whose predictions are wrong more often the higher they are."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    return u, rng.random(n) < 1.0 - 0.8 * u


def test_routing_puts_a_value_on_a_threshold_in_the_lower_tier():
    triage = Triage((0.15, 0.4))
    assert triage.route([0.0, 0.15, 0.2, 0.4, 0.41]).tolist() == ["auto", "auto", "verify", "verify", "review"]
    assert triage.tiers == DEFAULT_TIERS


def test_the_guides_single_review_threshold():
    triage = Triage(thresholds=0.15, tiers=("auto", "review"))
    assert triage.route([0.1, 0.16]).tolist() == ["auto", "review"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(thresholds=(0.15,)), "expected 2 threshold"),
        (dict(thresholds=(0.5, 0.2)), "non-decreasing"),
        (dict(thresholds=(0.1,), tiers=("a", "a")), "distinct"),
        (dict(thresholds=(), tiers=("only",)), "at least two"),
    ],
)
def test_invalid_triage_is_rejected(kwargs, match):
    with pytest.raises(InputError, match=match):
        Triage(**kwargs)


def test_fitted_thresholds_meet_the_targets_on_validation_and_on_fresh_data():
    u, ok = synthetic(5000, seed=0)
    triage = fit_thresholds(u, ok, target_review_rate=0.10, target_auto_accuracy=0.95)
    tiers = triage.report(u, ok).tiers
    assert 0.10 - 1 / 5000 <= tiers[2].coverage <= 0.10
    assert tiers[0].accuracy >= 0.95
    assert tiers[1].count > 0
    # Fresh data from the same distribution: binomial sd of the review share is 0.004; allow 0.02 (5 sd).
    test = triage.report(*synthetic(5000, seed=1)).tiers
    assert abs(test[2].coverage - 0.10) < 0.02
    assert test[0].accuracy > 0.95 - 0.02


def test_auto_tier_is_the_largest_prefix_reaching_the_accuracy():
    u = np.arange(10) / 10
    ok = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 0], bool)
    # prefix accuracies: 4 -> 1.0, 5 -> 0.8 (below), 9 -> 0.889 (the largest at or above 0.85), 10 -> 0.8
    triage = fit_thresholds(u, ok, target_auto_accuracy=0.85, tiers=("auto", "review"))
    assert triage.thresholds == (0.8,)
    assert triage.report(u, ok).tiers[0].accuracy == pytest.approx(8 / 9)


def test_ties_are_never_split_so_the_review_rate_stays_at_most_the_target():
    rng = np.random.default_rng(2)
    u = rng.integers(0, 11, 1000) / 10  # variation-ratio-like values: many ties
    triage = fit_thresholds(u, np.ones(1000, bool), target_review_rate=0.15, tiers=("auto", "review"))
    review = np.mean(triage.route(u) == "review")
    assert review <= 0.15
    assert review > 0.15 - np.mean(u == np.min(u[u > triage.thresholds[0]]))  # only the tie at the edge is lost


def test_extreme_targets_give_empty_tiers():
    u, ok = synthetic(100, seed=3)
    assert fit_thresholds(u, ok, target_review_rate=0.0, tiers=("a", "b")).thresholds == (u.max(),)
    assert fit_thresholds(u, ok, target_review_rate=1.0, tiers=("a", "b")).thresholds == (-math.inf,)
    none_good = fit_thresholds(u, np.zeros(100, bool), target_auto_accuracy=0.5, tiers=("a", "b"))
    report = none_good.report(u, np.zeros(100, bool))
    assert report.tiers[0].count == 0 and math.isnan(report.tiers[0].accuracy)
    assert "-" in str(report)


def test_accuracy_target_reaching_into_review_empties_the_middle_tier():
    u, ok = synthetic(1000, seed=4)
    with pytest.warns(UserWarning, match="'verify' tier is empty"):
        triage = fit_thresholds(u, ok, target_review_rate=0.5, target_auto_accuracy=0.5)
    assert triage.thresholds[0] == triage.thresholds[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_review_rate=0.1),  # three tiers need both targets
        dict(target_review_rate=0.1, target_auto_accuracy=0.9, tiers=("auto", "review")),
        dict(tiers=("auto", "review")),
        dict(target_review_rate=0.1, target_auto_accuracy=0.9, tiers=("a", "b", "c", "d")),
    ],
)
def test_the_number_of_targets_must_match_the_tiers(kwargs):
    with pytest.raises(InputError, match="tiers"):
        fit_thresholds(*synthetic(50, seed=5), **kwargs)


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "0.1"])
def test_target_outside_zero_one_is_rejected(bad):
    with pytest.raises(InputError, match="target_review_rate: expected a number in \\[0, 1\\]"):
        fit_thresholds(*synthetic(50, seed=5), target_review_rate=bad, tiers=("a", "b"))


def test_report_counts_coverage_accuracy_and_risk_coverage():
    u = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.5, 0.9, 0.95])
    ok = np.array([1, 1, 1, 0, 1, 0, 1, 0], bool)
    report = Triage((0.1, 0.35)).report(u, ok)
    assert [(t.name, t.count) for t in report.tiers] == [("auto", 2), ("verify", 3), ("review", 3)]
    assert [t.coverage for t in report.tiers] == [0.25, 0.375, 0.375]
    assert [t.accuracy for t in report.tiers] == [1.0, 2 / 3, 1 / 3]
    assert [t.cumulative_coverage for t in report.tiers] == [0.25, 0.625, 1.0]
    assert report.tiers[1].cumulative_risk == pytest.approx(1 / 5)
    assert report.tiers[2].cumulative_risk == pytest.approx(1 - report.accuracy)
    coverage, risk = risk_coverage_curve(u, ok)
    np.testing.assert_array_equal(report.coverage, coverage)
    np.testing.assert_array_equal(report.risk, risk)
    assert 0 <= report.aurc <= 1


def test_report_table_is_readable():
    u = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.5, 0.9, 0.95])
    ok = np.array([1, 1, 1, 0, 1, 0, 1, 0], bool)
    text = str(Triage((0.1, 0.35)).report(u, ok))
    lines = text.splitlines()
    assert lines[0].split() == [
        "tier", "uncertainty", "count", "coverage", "accuracy", "cum.", "coverage", "cum.", "risk"
    ]
    assert lines[2].split() == ["auto", "<=", "0.1", "2", "25.0%", "100.0%", "25.0%", "0.0%"]
    assert lines[3].split() == ["verify", "(0.1,", "0.35]", "3", "37.5%", "66.7%", "62.5%", "20.0%"]
    assert lines[4].split()[:3] == ["review", ">", "0.35"]
    assert lines[5].split() == ["total", "8", "100.0%", "62.5%"]
    assert lines[6].startswith("AURC ")


def test_report_rejects_mismatched_inputs():
    with pytest.raises(InputError, match="correct"):
        Triage((0.1, 0.2)).report([0.1, 0.2], [True])
