"""DriftMonitor: false alarms in distribution, detection after a shift, windowing, effect sizes."""

from __future__ import annotations

import numpy as np
import pytest

from mcu.errors import InputError
from mcu.monitor import DriftCheck, DriftMonitor

WINDOW = 200


def in_distribution(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.beta(2, 8, n)  # uncertainties of familiar inputs: mostly low


def shifted(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.beta(3, 7, n)  # a moderate shift: median 0.18 -> 0.29, about one reference std


def test_at_most_5_of_100_in_distribution_windows_alarm():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(in_distribution(rng, 5000), window=WINDOW, alpha=0.01)
    for _ in range(100):  # non-overlapping windows: (nearly) independent tests, each alarming w.p. <= 1%
        monitor.update(in_distribution(rng, WINDOW))
    assert len(monitor.checks) == 100
    assert len(monitor.alarms) <= 5  # expected 1; P(more than 5) < 0.1% for independent tests


def test_a_shift_is_detected_within_two_windows():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(in_distribution(rng, 5000), window=WINDOW, alpha=0.01)
    shift_at = 10 * WINDOW + 70  # not on a window boundary
    assert monitor.update(in_distribution(rng, shift_at)) == []
    alarms = []
    for _ in range(4):
        alarms += monitor.update(shifted(rng, WINDOW))
    assert alarms, "no alarm after the shift"
    first = alarms[0]
    assert first.stop <= shift_at + 2 * WINDOW
    assert first.p_value < 0.01 and first.alarm
    assert 0 < first.statistic <= 1
    assert first.effect_size > 0.3 and first.median_shift > 0.3  # in reference standard deviations


def test_feeding_in_any_pieces_gives_the_same_checks():
    rng = np.random.default_rng(2)
    reference, stream = in_distribution(rng, 1000), np.r_[in_distribution(rng, 700), shifted(rng, 500)]
    whole = DriftMonitor(reference, window=100, step=30)
    whole.update(stream)
    pieces = DriftMonitor(reference, window=100, step=30)
    for piece in np.array_split(stream, [1, 2, 50, 51, 333, 334, 900]):
        pieces.update(piece)
    assert whole.checks == pieces.checks
    assert [(c.start, c.stop) for c in whole.checks[:3]] == [(0, 100), (30, 130), (60, 160)]
    assert whole.checks[-1].stop <= len(stream) and len(whole.checks) == (len(stream) - 100) // 30 + 1


def test_window_contents_are_the_right_scores():
    reference = np.linspace(0, 1, 101)
    monitor = DriftMonitor(reference, window=4, step=3)
    monitor.update(np.arange(10) / 10)
    check = monitor.checks[1]
    assert (check.start, check.stop) == (3, 7)
    direct = monitor.check(np.arange(3, 7) / 10)
    assert (direct.statistic, direct.p_value) == (check.statistic, check.p_value)
    np.testing.assert_allclose(check.median_shift, (0.45 - 0.5) / np.std(reference))


def test_min_effect_size_silences_significant_but_tiny_shifts():
    rng = np.random.default_rng(3)
    reference = rng.normal(0.0, 1.0, 20_000)
    tiny = rng.normal(0.08, 1.0, 20_000)  # significant with 20 000 scores, but only 0.08 std
    assert DriftMonitor(reference, window=20_000).update(tiny)
    gated = DriftMonitor(reference, window=20_000, min_effect_size=0.2)
    assert gated.update(tiny) == [] and len(gated.checks) == 1 and not gated.checks[0].alarm


def test_check_tests_a_batch_without_recording_it():
    rng = np.random.default_rng(4)
    monitor = DriftMonitor(in_distribution(rng, 2000), window=WINDOW)
    result = monitor.check(shifted(rng, 500))
    assert isinstance(result, DriftCheck) and result.alarm and (result.start, result.stop) == (0, 500)
    assert monitor.checks == []


def test_empty_update_is_a_no_op():
    monitor = DriftMonitor(np.linspace(0, 1, 50), window=10)
    assert monitor.update([]) == [] and monitor.checks == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reference_scores=np.ones(100)), "two distinct values"),
        (dict(reference_scores=[]), "reference_scores"),
        (dict(reference_scores=np.ones((10, 2))), "reference_scores"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(window=0), "window"),
        (dict(step=0), "step"),
        (dict(min_effect_size=-1), "min_effect_size"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, match):
    args = {"reference_scores": np.linspace(0, 1, 50), **kwargs}
    with pytest.raises(InputError, match=match):
        DriftMonitor(**args)


def test_non_finite_production_scores_are_rejected():
    with pytest.raises(InputError, match="scores"):
        DriftMonitor(np.linspace(0, 1, 50), window=5).update([0.1, np.nan])
