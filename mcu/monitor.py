"""Drift monitoring: compare production uncertainties with a reference from validation data.

When the distribution of uncertainties shifts, the model is seeing inputs its training data did not cover
(the reference guide's lesson: monitor the input distribution through the uncertainty). :class:`DriftMonitor`
keeps the validation uncertainties as a reference, collects production uncertainties into sliding windows, and
runs a two-sample Kolmogorov-Smirnov test (:func:`scipy.stats.ks_2samp`) of each full window against the
reference, with effect sizes that say how large the shift is, not only whether it is significant.

**What ``alpha`` controls.** ``alpha`` is the false-alarm rate *per window test*: when production follows
the reference distribution, each check alarms with probability at most ``alpha`` (the KS test is exact or
conservative; with many tied values, e.g. the variation ratio, it is conservative). It is not a rate per
day or per stream. With ``step < window`` the windows overlap, so consecutive tests share data and are
strongly dependent: alarms then come in clusters, the expected number of false alarms is still about
``alpha`` times the number of checks, but the chance of at least one false alarm over ``m`` checks is not
``1 - (1 - alpha)^m``. Non-overlapping windows (``step = window``, the default) are nearly independent (they
still share the one reference sample). To bound the probability of any false alarm over a horizon of ``m``
checks, use ``alpha / m`` (Bonferroni). With large windows tiny, harmless shifts become significant:
``min_effect_size`` additionally requires a shift of at least that many reference standard deviations.

Example:
    >>> rng = np.random.default_rng(0)
    >>> monitor = DriftMonitor(rng.beta(2, 8, 2000), window=200, alpha=0.01)
    >>> monitor.update(rng.beta(2, 8, 400))                 # same distribution: no alarm expected
    []
    >>> alarms = monitor.update(rng.beta(5, 5, 200))        # much more uncertain inputs
    >>> len(alarms), alarms[0].median_shift > 0
    (1, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import ks_2samp, wasserstein_distance

from mcu._checks import check_int, check_number
from mcu.errors import InputError
from mcu.metrics.calibration import validate_scores

__all__ = ["DriftCheck", "DriftMonitor"]


@dataclass(frozen=True)
class DriftCheck:
    """One window test. ``alarm`` is ``p_value < alpha`` and ``effect_size >= min_effect_size``.

    Attributes:
        start, stop: positions of the window in the production stream (``stop`` excluded; the first
            production score is position 0).
        statistic: the KS statistic ``D`` (largest gap between the two empirical CDFs, in ``[0, 1]``).
        p_value: of the two-sample KS test.
        effect_size: Wasserstein-1 distance between window and reference, in reference standard deviations.
        median_shift: ``(median(window) - median(reference)) / std(reference)``; positive = more uncertain.
        alarm: whether this check raised an alarm.
    """

    start: int
    stop: int
    statistic: float
    p_value: float
    effect_size: float
    median_shift: float
    alarm: bool


class DriftMonitor:
    """Sliding-window two-sample KS tests of production uncertainties against a validation reference.

    Args:
        reference_scores: uncertainties of in-distribution (validation) data, ``(M,)``, not all equal.
        window: production scores per test.
        step: new scores between two tests (default ``window``: non-overlapping windows).
        alpha: per-window false-alarm rate (see the module docstring).
        min_effect_size: also require this Wasserstein distance, in reference standard deviations.

    Memory is ``O(M + window)`` plus one :class:`DriftCheck` per test in :attr:`checks`.
    """

    def __init__(self, reference_scores: Any, *, window: int = 500, step: int | None = None, alpha: float = 0.01,
                 min_effect_size: float = 0.0) -> None:
        check_int(window, "window", minimum=1)
        check_int(step, "step", minimum=1, allow_none=True)
        self.reference = validate_scores(reference_scores, "reference_scores")
        self.window, self.step = int(window), int(window if step is None else step)
        self.alpha = check_number(alpha, "alpha", minimum=0, maximum=1, strict=True)
        self.min_effect_size = check_number(min_effect_size, "min_effect_size", minimum=0)
        self._median = float(np.median(self.reference))
        self._scale = float(np.std(self.reference))
        if not self._scale > 0:
            raise InputError(
                "reference_scores: expected at least two distinct values (their spread is the effect-size unit)."
            )
        self.checks: list[DriftCheck] = []
        self._recent = np.empty(0)  # the last `window` production scores at most
        self._seen = 0
        self._next_stop = self.window

    @property
    def alarms(self) -> list[DriftCheck]:
        """The checks that raised an alarm."""
        return [check for check in self.checks if check.alarm]

    def update(self, scores: Any) -> list[DriftCheck]:
        """Feed production uncertainties; test every window they complete.

        Args:
            scores: new production uncertainties ``(n,)``, in stream order (any ``n``, including 0).

        Returns:
            The alarms raised by this update (every test is also recorded in :attr:`checks`).
        """
        try:
            empty = np.size(scores) == 0
        except ValueError:  # ragged: the check below says so
            empty = False
        new = np.empty(0) if empty else validate_scores(scores, "scores")
        stream = np.concatenate([self._recent, new])
        offset = self._seen - len(self._recent)  # stream position of stream[0]
        self._seen += len(new)
        found = []
        while self._next_stop <= self._seen:
            stop = self._next_stop - offset
            check = self._test(stream[stop - self.window : stop], self._next_stop - self.window)
            self.checks.append(check)
            found += [check] if check.alarm else []
            self._next_stop += self.step
        self._recent = stream[-self.window :]
        return found

    def check(self, scores: Any) -> DriftCheck:
        """Test one batch of scores against the reference, outside the stream: not recorded, positions
        ``start``/``stop`` are within the batch."""
        return self._test(validate_scores(scores, "scores"), start=0)

    def _test(self, window: np.ndarray, start: int) -> DriftCheck:
        result = ks_2samp(self.reference, window)
        effect = wasserstein_distance(self.reference, window) / self._scale
        p_value = float(result.pvalue)
        return DriftCheck(
            start=start, stop=start + len(window), statistic=float(result.statistic), p_value=p_value,
            effect_size=float(effect), median_shift=(float(np.median(window)) - self._median) / self._scale,
            alarm=p_value < self.alpha and effect >= self.min_effect_size,
        )
