"""Uncertainty of a classifier from Monte Carlo samples of its outputs.

All functions take ``samples`` of shape ``(T, N, C)``: T stochastic forward passes (samples axis first),
N examples, C classes. ``from_logits`` defaults to ``False`` (samples you pass: logits passed by mistake
fail the checks loudly; the functions that run a model, such as :func:`mcu.predict`, default to ``True``; see
``docs/architecture.md``). With ``from_logits=False`` the samples must be probabilities (finite, in [0, 1],
each row summing to 1 within the tolerance of :func:`mcu.metrics._validation.prob_sum_atol`); they are
checked and never renormalised. With
``from_logits=True`` a numerically stable log-softmax is applied first, so logits of any finite magnitude
(1e4 and beyond) work.

Computation is in float64. Entropies use ``0 * log 0 = 0`` and are in nats unless ``base`` is given
(``base=2`` gives bits). Notation: ``p_t`` is the probability vector of sample t, ``p̄ = mean_t p_t``
and ``H(p) = -sum_c p_c log p_c``.

=====================  ===================================================  =========
function               formula                                              shape
=====================  ===================================================  =========
mean_probabilities     ``p̄``                                                (N, C)
predictive_entropy     ``H(p̄)`` (total uncertainty)                         (N,)
expected_entropy       ``mean_t H(p_t)`` (aleatoric part)                   (N,)
mutual_information     ``H(p̄) - mean_t H(p_t)`` (epistemic part, BALD)      (N,)
variation_ratio        ``1 - (count of the modal argmax label) / T``        (N,)
margin                 ``p̄_(1) - p̄_(2)`` (largest minus second largest)      (N,)
max_probability        ``max_c p̄_c`` (alias ``confidence``)                  (N,)
predictive_variance    ``var_t p_t`` (population variance, ddof=0)          (N, C)
=====================  ===================================================  =========
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax, xlogy

from mcu.metrics._validation import log_base, validate_classification_samples

__all__ = [
    "classification_summary",
    "confidence",
    "expected_entropy",
    "margin",
    "max_probability",
    "mean_probabilities",
    "mutual_information",
    "predictive_entropy",
    "predictive_variance",
    "probabilities_and_entropies",
    "variation_ratio",
]


# --------------------------------------------------------------------------------------------------------
# Building blocks, shared with mcu.metrics.streaming and mcu.metrics.convergence (and, for the public
# probabilities_and_entropies, with mcu.active.acquisition).
# --------------------------------------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis in float64, for any finite logits: a gap to the largest logit beyond the
    float64 range (logits near +/-1e308) gives ``-inf``, i.e. a probability of exactly 0, never NaN."""
    with np.errstate(over="ignore"):
        return log_softmax(logits, axis=-1)


def _probabilities(samples: Any, from_logits: bool) -> np.ndarray:
    """Validated float64 probabilities ``(T, N, C)``."""
    array = validate_classification_samples(samples, from_logits)
    return np.exp(_log_softmax(array)) if from_logits else array


def probabilities_and_entropies(
    samples: Any, from_logits: bool, argument: str = "samples"
) -> tuple[np.ndarray, np.ndarray]:
    """Validated probabilities ``(T, N, C)`` and per-sample entropies ``H(p_t)`` in nats ``(T, N)``.

    For logits the entropy is ``-sum_c p_c log p_c`` with ``log p`` from the log-softmax, so a class whose
    probability underflows to 0 contributes exactly 0 instead of ``0 * -inf``.
    """
    array = validate_classification_samples(samples, from_logits, argument)
    if not from_logits:
        return array, _entropy_nats(array)
    log_p = _log_softmax(array)
    probs = np.exp(log_p)
    return probs, -np.sum(probs * np.where(probs > 0, log_p, 0.0), axis=-1)  # 0 log 0 = 0


_probabilities_and_entropies = probabilities_and_entropies  # the name the other metric modules use


def _entropy_nats(probs: np.ndarray) -> np.ndarray:
    """``-sum_c p_c log p_c`` over the last axis, with ``0 log 0 = 0``."""
    return -np.sum(xlogy(probs, probs), axis=-1)


def _argmax_counts(probs: np.ndarray) -> np.ndarray:
    """How often each class is the argmax over the samples: ``(T, N, C) -> (N, C)`` int64.

    Ties within a sample go to the lowest class index (``numpy.argmax``).
    """
    _, n, c = probs.shape
    flat = np.argmax(probs, axis=-1) + c * np.arange(n)  # (T, N) index into the flattened (N, C) table
    return np.bincount(flat.ravel(), minlength=n * c).reshape(n, c)


def _variation_ratio_from_counts(counts: np.ndarray, n_samples: int) -> np.ndarray:
    return 1.0 - counts.max(axis=-1) / n_samples


def _margin_from_mean(mean_probs: np.ndarray) -> np.ndarray:
    """Largest minus second largest entry of each row; with one class the second largest counts as 0."""
    if mean_probs.shape[-1] == 1:
        return mean_probs[..., 0].copy()
    top_two = np.partition(mean_probs, -2, axis=-1)[..., -2:]
    return top_two[..., 1] - top_two[..., 0]


def _summary(
    mean_probs: np.ndarray,
    sum_sq_dev: np.ndarray,
    mean_entropy_nats: np.ndarray,
    counts: np.ndarray,
    n_samples: int,
    base: Any,
) -> dict[str, Any]:
    """Every metric of this module from O(N * C) statistics (the dense functions and the accumulator)."""
    scale = log_base(base)
    total = _entropy_nats(mean_probs) / scale
    aleatoric = mean_entropy_nats / scale
    return {
        "mean_probabilities": mean_probs,
        "predictive_entropy": total,
        "expected_entropy": aleatoric,
        "mutual_information": np.maximum(total - aleatoric, 0.0),
        "variation_ratio": _variation_ratio_from_counts(counts, n_samples),
        "margin": _margin_from_mean(mean_probs),
        "max_probability": mean_probs.max(axis=-1),
        "predictive_variance": sum_sq_dev / n_samples,
        "n_samples": n_samples,
    }


# --------------------------------------------------------------------------------------------------------
# Public metrics.
# --------------------------------------------------------------------------------------------------------


def mean_probabilities(samples: Any, *, from_logits: bool = False) -> np.ndarray:
    """Mean predicted probability of each class over the Monte Carlo samples, ``p̄ = mean_t p_t``.

    Args:
        samples: Probabilities (``from_logits=False``) or logits (``from_logits=True``).
        from_logits: Whether ``samples`` are logits; a stable softmax is applied if so.

    Returns:
        The mean probabilities, float64; each row sums to 1.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N, C)``.

    Raises:
        InputError: wrong rank, ``T = 0`` or ``C = 0``, NaN/inf, or (for probabilities) entries outside
            [0, 1] or rows not summing to 1.

    Example:
        >>> import numpy as np
        >>> mean_probabilities(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))
        array([[0.5, 0.5]])
    """
    return _probabilities(samples, from_logits).mean(axis=0)


def predictive_entropy(samples: Any, *, from_logits: bool = False, base: float | None = None) -> np.ndarray:
    """Entropy of the mean prediction, ``H(p̄) = -sum_c p̄_c log p̄_c``: total uncertainty.

    Ranges over ``[0, log C]``; it is ``log C`` exactly when ``p̄`` is uniform.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.
        base: Logarithm base; ``None`` means natural log (nats), ``2`` gives bits.

    Returns:
        Predictive entropy of each example, float64.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N,)``.

    Raises:
        InputError: see :func:`mean_probabilities`; also a ``base`` that is not positive or equals 1.

    Example:
        >>> import numpy as np
        >>> uniform = np.full((3, 1, 4), 0.25)   # T=3 samples, N=1 example, C=4 classes
        >>> bool(np.isclose(predictive_entropy(uniform)[0], np.log(4)))
        True
        >>> predictive_entropy(uniform, base=2)
        array([2.])
    """
    scale = log_base(base)  # validate before the work
    return _entropy_nats(mean_probabilities(samples, from_logits=from_logits)) / scale


def expected_entropy(samples: Any, *, from_logits: bool = False, base: float | None = None) -> np.ndarray:
    """Mean entropy of the individual samples, ``mean_t H(p_t)``: the aleatoric part of the uncertainty.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.
        base: Logarithm base; ``None`` means natural log.

    Returns:
        Expected entropy of each example, float64, in ``[0, predictive_entropy]``.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N,)``.

    Raises:
        InputError: see :func:`predictive_entropy`.

    Example:
        Two confident samples that disagree: each has zero entropy, their mean has one bit.

        >>> import numpy as np
        >>> disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> expected_entropy(disagree)
        array([0.])
        >>> predictive_entropy(disagree, base=2)
        array([1.])
    """
    scale = log_base(base)  # validate before the work
    _, entropies = probabilities_and_entropies(samples, from_logits)
    return entropies.mean(axis=0) / scale


def mutual_information(samples: Any, *, from_logits: bool = False, base: float | None = None) -> np.ndarray:
    """Mutual information between the prediction and the model weights (BALD): epistemic uncertainty.

    ``I = H(p̄) - mean_t H(p_t)``. By Jensen's inequality it lies in ``[0, H(p̄)]``; it is 0 when all T
    samples agree (in particular when ``T = 1``). The difference is clipped at 0 only to remove float
    round-off (a few ulp below zero), never a genuine negative value.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.
        base: Logarithm base; ``None`` means natural log.

    Returns:
        Mutual information of each example, float64.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N,)``.

    Raises:
        InputError: see :func:`predictive_entropy`.

    Example:
        Two confident samples that disagree carry one bit of epistemic uncertainty:

        >>> import numpy as np
        >>> mutual_information(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]), base=2)
        array([1.])
    """
    scale = log_base(base)
    probs, entropies = probabilities_and_entropies(samples, from_logits)
    total = _entropy_nats(probs.mean(axis=0))
    return np.maximum(total - entropies.mean(axis=0), 0.0) / scale


def variation_ratio(samples: Any, *, from_logits: bool = False) -> np.ndarray:
    """Fraction of samples whose predicted label differs from the most frequent one.

    ``1 - f_mode / T`` where ``f_mode`` is how often the modal argmax label occurs among the T samples.
    Ranges over ``[0, 1 - 1/C]``. Within a sample, ties between classes go to the lowest class index, so
    the result is deterministic.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.

    Returns:
        Variation ratio of each example, float64.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N,)``.

    Raises:
        InputError: see :func:`mean_probabilities`.

    Example:
        Labels 0, 0, 1, 0 over four samples: the mode occurs 3 times out of 4.

        >>> import numpy as np
        >>> s = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]], [[0.6, 0.4]]])
        >>> variation_ratio(s)
        array([0.25])
    """
    probs = _probabilities(samples, from_logits)
    return _variation_ratio_from_counts(_argmax_counts(probs), probs.shape[0])


def margin(samples: Any, *, from_logits: bool = False) -> np.ndarray:
    """Largest minus second largest mean probability, ``p̄_(1) - p̄_(2)``; small means uncertain.

    With a single class (``C = 1``) the second largest probability is taken as 0, so the margin is 1.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.

    Returns:
        Margin of each example, float64, in ``[0, 1]``.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N,)``.

    Raises:
        InputError: see :func:`mean_probabilities`.

    Example:
        >>> import numpy as np
        >>> margin(np.array([[[0.5, 0.25, 0.25]]]))
        array([0.25])
    """
    return _margin_from_mean(mean_probabilities(samples, from_logits=from_logits))


def max_probability(samples: Any, *, from_logits: bool = False) -> np.ndarray:
    """Largest mean probability, ``max_c p̄_c``: the confidence of the predicted class.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.

    Returns:
        Confidence of each example, float64, in ``[1/C, 1]``.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N,)``.

    Raises:
        InputError: see :func:`mean_probabilities`.

    Example:
        >>> import numpy as np
        >>> max_probability(np.array([[[0.5, 0.25, 0.25]], [[1.0, 0.0, 0.0]]]))
        array([0.75])
    """
    return mean_probabilities(samples, from_logits=from_logits).max(axis=-1)


confidence = max_probability
"""Alias of :func:`max_probability`."""


def predictive_variance(samples: Any, *, from_logits: bool = False) -> np.ndarray:
    """Variance over the samples of each class probability, ``mean_t (p_t - p̄)^2`` (ddof=0).

    The population variance (divide by T, not T - 1) is used throughout mcu, as in :mod:`numpy.var`.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.

    Returns:
        Variance of each class probability of each example, float64.

    Shape:
        samples: ``(T, N, C)``. Returns: ``(N, C)``.

    Raises:
        InputError: see :func:`mean_probabilities`.

    Example:
        >>> import numpy as np
        >>> predictive_variance(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))
        array([[0.25, 0.25]])
    """
    return _probabilities(samples, from_logits).var(axis=0)


def classification_summary(samples: Any, *, from_logits: bool = False, base: float | None = None) -> dict[str, Any]:
    """Every metric of this module at once, validating and converting the samples a single time.

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.
        base: Logarithm base of the entropies; ``None`` means natural log.

    Returns:
        A dict keyed by the metric function names (``mean_probabilities``, ``predictive_entropy``,
        ``expected_entropy``, ``mutual_information``, ``variation_ratio``, ``margin``, ``max_probability``,
        ``predictive_variance``) plus ``n_samples`` (T). The same keys as
        :meth:`mcu.metrics.ClassificationAccumulator.result`.

    Shape:
        samples: ``(T, N, C)``. Values: as the functions of the same name.

    Raises:
        InputError: see :func:`predictive_entropy`.

    Example:
        >>> import numpy as np
        >>> summary = classification_summary(np.full((2, 1, 2), 0.5), base=2)
        >>> summary["predictive_entropy"], summary["mutual_information"], summary["n_samples"]
        (array([1.]), array([0.]), 2)
    """
    log_base(base)  # validate before the work
    probs, entropies = probabilities_and_entropies(samples, from_logits)
    mean_probs = probs.mean(axis=0)
    sum_sq_dev = np.sum((probs - mean_probs) ** 2, axis=0)
    return _summary(mean_probs, sum_sq_dev, entropies.mean(axis=0), _argmax_counts(probs), probs.shape[0], base)
