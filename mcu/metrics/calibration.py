"""Calibration and evaluation of uncertainty: ECE and reliability diagrams, Brier score, NLL, AUROC/AUPR
for separating two groups by an uncertainty score, and risk-coverage curves for selective prediction.

Probabilities are ``(N, C)`` arrays, typically :func:`mcu.metrics.mean_probabilities`; they are checked
(finite, in [0, 1], rows summing to 1) and never renormalised. Labels are integers in ``[0, C)``.
scikit-learn is not used here; the tests check agreement with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from mcu._checks import check_int
from mcu.errors import InputError
from mcu.metrics._validation import (
    as_float_array,
    as_labels,
    check_finite,
    check_ndim,
    check_probabilities,
)

__all__ = [
    "ReliabilityDiagram",
    "aupr",
    "aurc",
    "auroc",
    "brier_score",
    "expected_calibration_error",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "reliability_diagram",
    "risk_coverage_curve",
    "validate_scores",
    "validate_uncertainty_and_correct",
]


def _probs_and_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(N, C)`` probabilities with ``N >= 1`` and matching ``(N,)`` labels."""
    array = as_float_array(probs, "probs")
    check_ndim(array, "probs", 2, "(N, C)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"probs: expected at least one example and one class, got shape {array.shape}.")
    check_probabilities(array, "probs", input_dtype=np.asarray(probs).dtype)
    return array, as_labels(labels, array.shape[0], array.shape[1])


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin statistics of a reliability diagram (confidence = max probability, equal-width bins).

    Attributes:
        bin_edges: ``(n_bins + 1,)`` edges from 0 to 1; bin b holds confidences in
            ``(bin_edges[b], bin_edges[b + 1]]`` (the first bin also holds 0).
        counts: ``(n_bins,)`` number of examples per bin.
        accuracy: ``(n_bins,)`` fraction of correct predictions per bin; NaN for an empty bin.
        confidence: ``(n_bins,)`` mean confidence per bin; NaN for an empty bin.
        ece: Expected calibration error, ``sum_b counts_b / N * |accuracy_b - confidence_b|``.
    """

    bin_edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    ece: float


#: Most bins of a reliability diagram (each bin costs a few float64 per array; beyond this, memory, not insight).
MAX_BINS = 1 << 20


def reliability_diagram(probs: Any, labels: Any, n_bins: int = 15) -> ReliabilityDiagram:
    """Bin the examples by confidence and compare accuracy with confidence in each bin.

    The confidence of an example is its largest probability and its prediction the argmax (ties go to the
    lowest class). Bins are ``n_bins`` equal-width intervals ``(lo, hi]`` over [0, 1] (Guo et al., 2017).

    Args:
        probs: Predicted probabilities (e.g. mean MC-dropout probabilities).
        labels: True class of each example.
        n_bins: Number of equal-width bins, 1 to :data:`MAX_BINS`.

    Returns:
        A :class:`ReliabilityDiagram` holding the bins and the ECE.

    Shape:
        probs: ``(N, C)``, N >= 1; labels: ``(N,)``.

    Raises:
        InputError: wrong shapes, invalid probabilities, labels outside ``[0, C)``, or ``n_bins`` outside
            ``[1, MAX_BINS]``.

    Example:
        >>> import numpy as np
        >>> diagram = reliability_diagram(np.array([[0.8, 0.2], [0.8, 0.2]]), [0, 1], n_bins=5)
        >>> diagram.counts
        array([0, 0, 0, 2, 0])
        >>> round(diagram.ece, 12)   # confidence 0.8, accuracy 0.5
        0.3
    """
    array, label_arr = _probs_and_labels(probs, labels)
    n_bins = check_int(n_bins, "n_bins", minimum=1, maximum=MAX_BINS)
    conf = array.max(axis=1)
    correct = (np.argmax(array, axis=1) == label_arr).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / counts
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / counts
    gaps = np.where(counts > 0, np.abs(accuracy - mean_conf), 0.0)
    ece = float(np.sum(counts / conf.size * gaps))
    return ReliabilityDiagram(edges, counts, accuracy, mean_conf, ece)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (see :func:`reliability_diagram`).

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``. For the per-bin data (to plot or inspect), call
    :func:`reliability_diagram`, whose ``ece`` attribute is this number.

    Args:
        probs: Predicted probabilities.
        labels: True class of each example.
        n_bins: Number of equal-width bins.

    Returns:
        The ECE, a float in [0, 1].

    Shape:
        probs: ``(N, C)``, N >= 1; labels: ``(N,)``.

    Raises:
        InputError: see :func:`reliability_diagram`.

    Example:
        Always 100 % confident and always right: perfectly calibrated.

        >>> import numpy as np
        >>> expected_calibration_error(np.eye(3), [0, 1, 2])
        0.0
    """
    return reliability_diagram(probs, labels, n_bins).ece


def plot_reliability_diagram(diagram: ReliabilityDiagram, ax: Any = None) -> Any:
    """Draw a reliability diagram with matplotlib (imported only when this is called).

    Bars show accuracy per bin, a dashed diagonal shows perfect calibration, and the title gives the ECE.

    Args:
        diagram: The output of :func:`reliability_diagram`.
        ax: A matplotlib ``Axes`` to draw on; a new figure is created if ``None``.

    Returns:
        The ``Axes`` drawn on.

    Shape:
        Not applicable (draws the ``n_bins`` bars of ``diagram``).

    Raises:
        InputError: ``diagram`` is not a :class:`ReliabilityDiagram`.
        ImportError: matplotlib is not installed (``pip install "mcu[plot]"``).

    Example:
        >>> import numpy as np
        >>> ax = plot_reliability_diagram(reliability_diagram(np.eye(2), [0, 1]))  # doctest: +SKIP
    """
    if not isinstance(diagram, ReliabilityDiagram):
        raise InputError(
            f"diagram: expected a ReliabilityDiagram (from reliability_diagram(...)), got {type(diagram).__name__}."
        )
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('plot_reliability_diagram needs matplotlib: pip install "mcu[plot]"') from exc
    if ax is None:
        _, ax = plt.subplots()
    lefts, widths = diagram.bin_edges[:-1], np.diff(diagram.bin_edges)
    ax.bar(lefts, np.nan_to_num(diagram.accuracy), width=widths, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"ECE = {diagram.ece:.4f}")
    ax.legend(loc="upper left")
    return ax


def brier_score(probs: Any, labels: Any) -> float:
    """Multi-class Brier score, ``mean_i sum_c (p_ic - [y_i = c])^2`` (Brier, 1950).

    Ranges over [0, 2]. For two classes this is twice scikit-learn's binary ``brier_score_loss`` (which
    scores only the positive class).

    Args:
        probs: Predicted probabilities.
        labels: True class of each example.

    Returns:
        The Brier score, a float.

    Shape:
        probs: ``(N, C)``, N >= 1; labels: ``(N,)``.

    Raises:
        InputError: see :func:`reliability_diagram`.

    Example:
        >>> import numpy as np
        >>> brier_score(np.array([[0.5, 0.5]]), [0])   # 0.5**2 + 0.5**2
        0.5
    """
    array, label_arr = _probs_and_labels(probs, labels)
    one_hot = np.zeros_like(array)
    one_hot[np.arange(array.shape[0]), label_arr] = 1.0
    return float(np.mean(np.sum((array - one_hot) ** 2, axis=1)))


def negative_log_likelihood(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the true labels, ``-mean_i log p_{i, y_i}`` (nats).

    No clipping: a true label with probability exactly 0 gives ``inf`` (exact), without a warning. Clip the
    probabilities yourself if a finite surrogate is wanted.

    Args:
        probs: Predicted probabilities.
        labels: True class of each example.

    Returns:
        The NLL, a float in ``[0, inf]``.

    Shape:
        probs: ``(N, C)``, N >= 1; labels: ``(N,)``.

    Raises:
        InputError: see :func:`reliability_diagram`.

    Example:
        >>> import numpy as np
        >>> bool(np.isclose(negative_log_likelihood(np.full((2, 4), 0.25), [0, 3]), np.log(4)))
        True
        >>> negative_log_likelihood(np.array([[1.0, 0.0]]), [1])
        inf
    """
    array, label_arr = _probs_and_labels(probs, labels)
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(array[np.arange(array.shape[0]), label_arr])))


def validate_scores(scores: Any, argument: str) -> np.ndarray:
    """``scores`` as a non-empty finite 1-d float64 array; :class:`~mcu.errors.InputError` naming ``argument``.

    Example:
        >>> validate_scores([0.1, 0.4], "scores").tolist()
        [0.1, 0.4]
    """
    array = as_float_array(scores, argument)
    check_ndim(array, argument, 1, "(n,)")
    if array.size == 0:
        raise InputError(f"{argument}: expected at least one score, got an empty array.")
    check_finite(array, argument)
    return array


def auroc(scores_pos: Any, scores_neg: Any) -> float:
    """Area under the ROC curve for telling positives from negatives by a score (higher = positive).

    Equals ``P(s_pos > s_neg) + 0.5 * P(s_pos = s_neg)`` (the Mann-Whitney U statistic with mid-ranks),
    which is what scikit-learn's ``roc_auc_score`` gives, ties included. Typical use: scores = mutual
    information, positives = misclassified or out-of-distribution examples.

    Args:
        scores_pos: Scores of the positive group.
        scores_neg: Scores of the negative group.

    Returns:
        The AUROC, a float in [0, 1]; 0.5 is chance.

    Shape:
        scores_pos: ``(n_pos,)``, scores_neg: ``(n_neg,)``, both non-empty.

    Raises:
        InputError: not 1-D, empty, or NaN/inf.

    Example:
        >>> auroc([3.0, 4.0], [1.0, 2.0])
        1.0
        >>> auroc([1.0], [1.0])
        0.5
    """
    pos, neg = validate_scores(scores_pos, "scores_pos"), validate_scores(scores_neg, "scores_neg")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def aupr(scores_pos: Any, scores_neg: Any) -> float:
    """Area under the precision-recall curve as average precision, positives being the positive class.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds in decreasing order, where a
    threshold accepts every example with a score ``>=`` it (so tied scores enter together). This is the
    definition of scikit-learn's ``average_precision_score`` (no interpolation).

    Args:
        scores_pos: Scores of the positive group.
        scores_neg: Scores of the negative group.

    Returns:
        The average precision, a float in (0, 1]; chance level is ``n_pos / (n_pos + n_neg)``.

    Shape:
        scores_pos: ``(n_pos,)``, scores_neg: ``(n_neg,)``, both non-empty.

    Raises:
        InputError: not 1-D, empty, or NaN/inf.

    Example:
        >>> aupr([3.0, 4.0], [1.0, 2.0])
        1.0
        >>> aupr([1.0], [1.0])   # one threshold: recall 1 at precision 1/2
        0.5
    """
    pos, neg = validate_scores(scores_pos, "scores_pos"), validate_scores(scores_neg, "scores_neg")
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(is_pos)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0.0, true_pos]) / pos.size
    return float(np.sum(recall_gain * precision))


def validate_uncertainty_and_correct(uncertainty: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``uncertainty`` scores ``(N,)`` and ``correct`` as 0.0/1.0 floats of the same shape.

    Example:
        >>> validate_uncertainty_and_correct([0.2, 0.9], [True, False])[1].tolist()
        [1.0, 0.0]
    """
    unc = validate_scores(uncertainty, "uncertainty")
    corr = as_float_array(correct, "correct")
    check_ndim(corr, "correct", 1, "(N,)")
    if corr.shape != unc.shape:
        raise InputError(f"correct: expected shape {unc.shape} (one per uncertainty), got {corr.shape}.")
    if not np.isin(corr, (0.0, 1.0)).all():
        raise InputError("correct: expected booleans or 0/1 values, got other values.")
    return unc, corr


def risk_coverage_curve(uncertainty: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Selective-prediction risk as a function of coverage, answering the most certain examples first.

    For each distinct uncertainty threshold u (increasing), the accepted set is every example with
    uncertainty ``<= u``; coverage is its fraction of all examples and risk its error rate
    ``1 - mean(correct)``. Tied uncertainties are accepted together, so the curve does not depend on the
    order of ties. The last point has coverage 1 and the overall error rate.

    Args:
        uncertainty: Uncertainty score per example (higher = less certain).
        correct: Whether each prediction was correct (bool or 0/1).

    Returns:
        ``(coverage, risk)``, float64 arrays with one entry per distinct uncertainty value.

    Shape:
        uncertainty, correct: ``(N,)``, N >= 1. Returns: two arrays ``(K,)``, K = number of distinct values.

    Raises:
        InputError: not 1-D, different lengths, empty, NaN/inf, or ``correct`` not boolean.

    Example:
        >>> risk_coverage_curve([0.1, 0.2, 0.3, 0.4], [True, True, False, True])
        (array([0.25, 0.5 , 0.75, 1.  ]), array([0.        , 0.        , 0.33333333, 0.25      ]))
    """
    unc, corr = validate_uncertainty_and_correct(uncertainty, correct)
    order = np.argsort(unc, kind="stable")
    unc, corr = unc[order], corr[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(unc)), unc.size - 1]
    accepted = last_of_tie + 1.0
    errors = np.cumsum(1.0 - corr)[last_of_tie]
    return accepted / unc.size, errors / accepted


def aurc(uncertainty: Any, correct: Any) -> float:
    """Area under the risk-coverage curve (lower is better), as a step function.

    ``AURC = sum_k risk_k * (coverage_k - coverage_{k-1})`` over the points of
    :func:`risk_coverage_curve` (coverage_0 = 0). Without ties this is the mean, over m = 1..N, of the
    error rate among the m most certain examples (Geifman et al., 2019).

    Args:
        uncertainty: Uncertainty score per example (higher = less certain).
        correct: Whether each prediction was correct (bool or 0/1).

    Returns:
        The AURC, a float in [0, 1].

    Shape:
        uncertainty, correct: ``(N,)``, N >= 1.

    Raises:
        InputError: see :func:`risk_coverage_curve`.

    Example:
        Errors ranked last: risks 0, 0, 1/3, 1/2 at coverages 1/4 ... 1.

        >>> round(aurc([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]), 12)   # (0 + 0 + 1/3 + 1/2) / 4
        0.208333333333
    """
    coverage, risk = risk_coverage_curve(uncertainty, correct)
    return float(np.sum(risk * np.diff(np.r_[0.0, coverage])))
