"""Route predictions to handling tiers by their uncertainty: automatic, second check, human review.

A :class:`Triage` holds increasing thresholds ``t_0 <= t_1 <= ...`` and one tier name more than thresholds.
An example with uncertainty ``u`` goes to the first tier ``i`` with ``u <= t_i`` (the last tier takes the
rest), e.g. with the default tiers ``("auto", "verify", "review")``::

    u <= t_0 -> "auto"        t_0 < u <= t_1 -> "verify"        u > t_1 -> "review"

Thresholds come from a policy (the reference guide's review threshold of 0.15 on the predictive entropy) or
from validation data with :func:`fit_thresholds`, which meets a target share of human reviews and/or a
target accuracy of the automatic tier. :meth:`Triage.report` shows, per tier, how many examples land there,
their share (coverage) and accuracy, plus the cumulative risk-coverage view: the error rate you accept if
every tier up to this one is handled without review.

Example:
    >>> triage = Triage(thresholds=(0.15,), tiers=("auto", "review"))
    >>> triage.route([0.05, 0.15, 0.4]).tolist()
    ['auto', 'auto', 'review']
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mcu._checks import check_number, fail
from mcu.errors import InputError
from mcu.metrics.calibration import aurc, risk_coverage_curve, validate_scores, validate_uncertainty_and_correct

__all__ = ["DEFAULT_TIERS", "TierStats", "Triage", "TriageReport", "fit_thresholds", "load_thresholds",
           "save_thresholds"]

#: Straight through / second check (SMS, face check) / human review — the fraud tiers of the reference guide.
DEFAULT_TIERS = ("auto", "verify", "review")


@dataclass(frozen=True)
class Triage:
    """Uncertainty thresholds and the tiers they separate.

    Args:
        thresholds: ``len(tiers) - 1`` non-decreasing numbers (``-inf``/``inf`` allowed: an empty tier).
        tiers: tier names, from the most automatic to the most manual.

    Example:
        >>> triage = Triage(thresholds=(0.1, 0.3))
        >>> triage.route([0.05, 0.2, 0.9]).tolist()
        ['auto', 'verify', 'review']
    """

    thresholds: tuple[float, ...]
    tiers: tuple[str, ...] = DEFAULT_TIERS

    def __post_init__(self) -> None:
        try:
            values = np.asarray(self.thresholds)
            ok = values.dtype.kind in "biuf" and values.ndim <= 1
        except (TypeError, ValueError):  # ragged or otherwise not an array of numbers
            ok = False
        if not ok:
            raise fail("thresholds", "a sequence of numbers", repr(self.thresholds))
        thresholds = tuple(float(t) for t in np.atleast_1d(values.astype(np.float64)))
        if isinstance(self.tiers, str):
            raise fail("tiers", "a sequence of tier names", repr(self.tiers))
        try:
            tiers = tuple(self.tiers)
        except TypeError:
            raise fail("tiers", "a sequence of tier names", repr(self.tiers)) from None
        if len(tiers) < 2 or len(set(tiers)) != len(tiers) or not all(isinstance(t, str) and t for t in tiers):
            raise InputError(f"tiers: expected at least two distinct non-empty names, got {tiers!r}.")
        if len(thresholds) != len(tiers) - 1:
            raise InputError(
                f"thresholds: expected {len(tiers) - 1} threshold(s) for the tiers {tiers!r}, got {thresholds!r} "
                "(for a single review threshold pass tiers=('auto', 'review'))."
            )
        if any(math.isnan(t) for t in thresholds) or any(a > b for a, b in zip(thresholds, thresholds[1:])):
            raise InputError(f"thresholds: expected non-decreasing numbers, got {thresholds!r}.")
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "tiers", tiers)

    def assign(self, uncertainty: Any) -> np.ndarray:
        """Tier position of each example (0 = the first tier).

        Shape:
            uncertainty: ``(N,)`` -> ``(N,)`` int64.

        Example:
            >>> Triage((0.1, 0.3)).assign([0.1, 0.3, 0.31]).tolist()
            [0, 1, 2]
        """
        u = validate_scores(uncertainty, "uncertainty")
        return np.searchsorted(np.asarray(self.thresholds), u, side="left").astype(np.int64)

    def route(self, uncertainty: Any) -> np.ndarray:
        """Tier name of each example, ``(N,)`` array of str."""
        return np.asarray(self.tiers)[self.assign(uncertainty)]

    def report(self, uncertainty: Any, correct: Any) -> "TriageReport":
        """Per-tier count, coverage and accuracy, and the risk-coverage view, on labeled data.

        Args:
            uncertainty: uncertainty of each prediction (higher = less certain), ``(N,)``.
            correct: whether each prediction was right, bool or 0/1, ``(N,)``.

        Example:
            >>> r = Triage((0.5,), ("auto", "review")).report([0.1, 0.2, 0.7, 0.9], [1, 1, 0, 1])
            >>> [(t.name, t.count, t.accuracy) for t in r.tiers]
            [('auto', 2, 1.0), ('review', 2, 0.5)]
        """
        u, ok = validate_uncertainty_and_correct(uncertainty, correct)
        position = self.assign(u)
        bounds = (-math.inf, *self.thresholds, math.inf)
        rows, accepted, errors = [], 0, 0.0
        for i, name in enumerate(self.tiers):
            in_tier = ok[position == i]
            accepted, errors = accepted + in_tier.size, errors + float(in_tier.size - in_tier.sum())
            rows.append(TierStats(
                name=name, low=bounds[i], high=bounds[i + 1], count=int(in_tier.size), coverage=in_tier.size / u.size,
                accuracy=float(in_tier.mean()) if in_tier.size else math.nan,
                cumulative_coverage=accepted / u.size, cumulative_risk=errors / accepted if accepted else math.nan,
            ))
        coverage, risk = risk_coverage_curve(u, ok)
        return TriageReport(tuple(rows), int(u.size), float(ok.mean()), aurc(u, ok), coverage, risk)


@dataclass(frozen=True)
class TierStats:
    """One tier of a :class:`TriageReport`: uncertainties in ``(low, high]``."""

    name: str
    low: float
    high: float
    count: int
    coverage: float
    accuracy: float
    cumulative_coverage: float
    cumulative_risk: float


@dataclass(frozen=True)
class TriageReport:
    """What a triage does on labeled data. ``str(report)`` is a readable table.

    Attributes:
        tiers: one :class:`TierStats` per tier.
        n: number of examples.
        accuracy: overall accuracy.
        aurc: area under the risk-coverage curve (lower is better; see :func:`mcu.metrics.calibration.aurc`).
        coverage, risk: the full risk-coverage curve, answering the most certain examples first.
    """

    tiers: tuple[TierStats, ...]
    n: int
    accuracy: float
    aurc: float
    coverage: np.ndarray = field(repr=False)
    risk: np.ndarray = field(repr=False)

    def __str__(self) -> str:
        headers = ("tier", "uncertainty", "count", "coverage", "accuracy", "cum. coverage", "cum. risk")
        rows = [
            (t.name, _interval(t.low, t.high), str(t.count), _pct(t.coverage), _pct(t.accuracy),
             _pct(t.cumulative_coverage), _pct(t.cumulative_risk))
            for t in self.tiers
        ]
        rows.append(("total", "", str(self.n), _pct(1.0), _pct(self.accuracy), "", ""))
        return _table(headers, rows) + f"\nAURC {self.aurc:.4f} (area under the risk-coverage curve; lower is better)"


def fit_thresholds(
    uncertainty: Any,
    correct: Any,
    *,
    target_review_rate: float | None = None,
    target_auto_accuracy: float | None = None,
    tiers: Sequence[str] = DEFAULT_TIERS,
) -> Triage:
    """Choose thresholds on validation data so that the tiers meet operational targets.

    * ``target_review_rate`` sets the last threshold: the largest share of examples sent to the last tier
      (human review) that does not exceed the target.
    * ``target_auto_accuracy`` sets the first threshold: the largest automatic tier whose accuracy is at
      least the target (the prefix of most certain examples; tied uncertainties are never split).

    Two tiers need exactly one target; three tiers need both (the middle tier is what lies between). If the
    accuracy target would let the automatic tier reach into the review tier, the first threshold is lowered to
    the last one (the middle tier is then empty) with a warning. Check the result on held-out data with
    :meth:`Triage.report`: the targets hold on the data they were fitted on.

    Args:
        uncertainty: validation uncertainties ``(N,)`` (higher = less certain).
        correct: whether each validation prediction was right ``(N,)``.
        target_review_rate: in ``[0, 1]``.
        target_auto_accuracy: in ``[0, 1]``.
        tiers: two or three tier names.

    Returns:
        The fitted :class:`Triage`.

    Example:
        >>> u = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        >>> ok = [1, 1, 1, 1, 1, 1, 0, 1, 0, 0]
        >>> fit_thresholds(u, ok, target_review_rate=0.2, target_auto_accuracy=1.0).thresholds
        (0.6, 0.8)
    """
    u, ok = validate_uncertainty_and_correct(uncertainty, correct)
    if isinstance(tiers, str) or not isinstance(tiers, Sequence):
        raise fail("tiers", "a sequence of two or three tier names", repr(tiers))
    tiers = tuple(tiers)
    given = {name: _rate(value, name) for name, value in
             (("target_review_rate", target_review_rate), ("target_auto_accuracy", target_auto_accuracy))
             if value is not None}
    if len(tiers) not in (2, 3) or len(given) != len(tiers) - 1:
        raise InputError(
            f"tiers: {len(tiers)} tiers need {len(tiers) - 1} threshold(s); got the targets {sorted(given) or 'none'}. "
            "Expected one of target_review_rate / target_auto_accuracy for two tiers, both for three "
            "(for more tiers, pass Triage(thresholds=...) directly)."
        )
    order = np.argsort(u, kind="stable")
    u, ok = u[order], ok[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(u)), u.size - 1]
    thresholds = []
    if "target_auto_accuracy" in given:
        thresholds.append(_auto_threshold(u, ok, last_of_tie, given["target_auto_accuracy"]))
    if "target_review_rate" in given:
        thresholds.append(_review_threshold(u, given["target_review_rate"]))
    if len(thresholds) == 2 and thresholds[0] > thresholds[1]:
        warnings.warn(
            f"target_auto_accuracy allows automatic handling up to {thresholds[0]:.4g}, above the review threshold "
            f"{thresholds[1]:.4g}; the '{tiers[1]}' tier is empty and the automatic tier stops at the review "
            "threshold.",
            stacklevel=2,
        )
        thresholds[0] = thresholds[1]
    return Triage(tuple(thresholds), tiers)


#: the ``"format"`` field of a thresholds file (:func:`save_thresholds`)
THRESHOLDS_FORMAT = "mcu-triage-thresholds/1"


def save_thresholds(path: str | os.PathLike[str], triage: Triage, *, score: str) -> None:
    """Write ``triage`` and the uncertainty score it was fitted on as a JSON file (``mcu serve --triage``).

    The file is ``{"format": "mcu-triage-thresholds/1", "score": ..., "thresholds": [...], "tiers": [...]}``;
    infinite thresholds (an empty tier) are written as the strings ``"inf"`` / ``"-inf"`` (JSON has no
    infinity).

    Args:
        path: the file to write.
        triage: the thresholds, e.g. from :func:`fit_thresholds`.
        score: the name of the uncertainty the thresholds apply to, e.g. ``"predictive_entropy"``.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "triage.json"
        >>> save_thresholds(path, Triage((0.1, math.inf)), score="predictive_entropy")
        >>> load_thresholds(path)
        (Triage(thresholds=(0.1, inf), tiers=('auto', 'verify', 'review')), 'predictive_entropy')
    """
    if not isinstance(triage, Triage):
        raise InputError(f"triage: expected a Triage, got {type(triage).__qualname__}.")
    if not isinstance(score, str) or not score:
        raise InputError(f"score: expected the name of the uncertainty score, got {score!r}.")
    thresholds = [t if math.isfinite(t) else ("inf" if t > 0 else "-inf") for t in triage.thresholds]
    content = {"format": THRESHOLDS_FORMAT, "score": score, "thresholds": thresholds, "tiers": list(triage.tiers)}
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2)
        file.write("\n")


def load_thresholds(path: str | os.PathLike[str]) -> tuple[Triage, str]:
    """Read a file written by :func:`save_thresholds`: the :class:`Triage` and its score name.

    Raises:
        InputError: the file is not valid JSON or not a thresholds file (the message names the field).
    """
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except OSError as exc:
        raise InputError(f"path: cannot read the thresholds file {os.fspath(path)!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"path: {os.fspath(path)!r} is not valid JSON ({exc}).") from exc
    where = f"thresholds file {os.fspath(path)!r}"
    if not isinstance(content, dict) or content.get("format") != THRESHOLDS_FORMAT:
        raise InputError(f"{where}: expected a JSON object with \"format\": {THRESHOLDS_FORMAT!r} "
                         "(written by mcu.triage.save_thresholds).")
    score, thresholds, tiers = content.get("score"), content.get("thresholds"), content.get("tiers")
    if not isinstance(score, str) or not score:
        raise InputError(f"{where}: field 'score': expected a score name, got {score!r}.")
    if not isinstance(thresholds, list) or not isinstance(tiers, list):
        raise InputError(f"{where}: fields 'thresholds' and 'tiers': expected lists, got {thresholds!r} and {tiers!r}.")
    values = []
    for t in thresholds:
        if t in ("inf", "-inf"):
            values.append(float(t))
        elif isinstance(t, (int, float)) and not isinstance(t, bool):
            values.append(float(t))
        else:
            raise InputError(f"{where}: field 'thresholds': expected numbers (or \"inf\"/\"-inf\"), got {t!r}.")
    return Triage(tuple(values), tuple(tiers)), score


def _review_threshold(u_sorted: np.ndarray, rate: float) -> float:
    """Smallest threshold leaving at most ``rate`` of the examples above it."""
    n_review = math.floor(rate * u_sorted.size + 1e-9)
    keep = u_sorted.size - n_review
    return -math.inf if keep == 0 else float(u_sorted[keep - 1])


def _auto_threshold(u_sorted: np.ndarray, ok_sorted: np.ndarray, last_of_tie: np.ndarray, target: float) -> float:
    """Largest threshold whose accepted prefix has accuracy ``>= target`` (``-inf``: none qualifies)."""
    accuracy = np.cumsum(ok_sorted)[last_of_tie] / (last_of_tie + 1.0)
    qualifying = np.flatnonzero(accuracy >= target - 1e-12)
    return -math.inf if qualifying.size == 0 else float(u_sorted[last_of_tie[qualifying[-1]]])


def _rate(value: Any, argument: str) -> float:
    return check_number(value, argument, minimum=0, maximum=1)


def _interval(low: float, high: float) -> str:
    if low == -math.inf:
        return "all" if high == math.inf else f"<= {high:.4g}"
    return f"> {low:.4g}" if high == math.inf else f"({low:.4g}, {high:.4g}]"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
