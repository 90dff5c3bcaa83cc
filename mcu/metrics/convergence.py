"""How many Monte Carlo samples are enough? Convergence curves and Monte Carlo standard errors.

:func:`convergence_curve` is the sample-count test: evaluate a statistic (for example the mean predictive
entropy, or the mean standard deviation of a regressor) on the first t samples for a ladder of t, each
with a bootstrap Monte Carlo standard error. :func:`smallest_sufficient_t` reads off the smallest t whose
standard error meets a tolerance.

:func:`mc_standard_errors` gives, per example, the Monte Carlo standard error of the predictive entropy,
expected entropy and mutual information of a classifier: the spread one would see between repeated runs
with the same T. Two methods:

* ``"delta"`` (first-order delta method, full sample covariance). Linearising ``H(p̄)`` around ``p̄``
  gives ``H(p̄) ≈ const + mean_t s_t`` with ``s_t = -sum_c p_tc log p̄_c`` (the ``+1`` of the gradient
  cancels because every ``p_t`` sums to 1), so ``SE(H(p̄)) = sd_t(s_t) / sqrt(T)``,
  ``SE(mean_t h_t) = sd_t(h_t) / sqrt(T)`` exactly (``h_t = H(p_t)``) and
  ``SE(MI) = sd_t(s_t - h_t) / sqrt(T)``. ``var(s)`` needs the full C x C covariance of the probabilities:
  all samples at once here, O(N * C^2) memory in the accumulator
  (``ClassificationAccumulator(..., exact_standard_errors=True)``).
* ``"bound"`` (the accumulator's default, O(N * C) memory). ``var(s)`` is replaced by an upper bound
  from per-class standard deviations only: by Minkowski's inequality
  ``sd(s) <= min_lambda sum_c |log p̄_c - lambda| sd(p_c)`` (any shift ``lambda`` leaves ``s`` unchanged
  up to a constant because the probabilities sum to 1; the best one is the ``sd``-weighted median of
  ``log p̄``). The mutual-information variance ``var(s) + var(h) - 2 cov(s, h)`` keeps its exact
  ``var(h)`` and ``cov(s, h) = -sum_c log p̄_c cov(p_c, h)`` (O(N * C) too). Never smaller than
  ``"delta"``, so a stopping rule built on it is conservative; exact for two classes and typically
  within a factor 1-2.5 for a handful of classes, looser for hundreds of classes. The expected-entropy
  SE is the same in both methods.

Standard deviations use ``ddof=1``; with ``T = 1`` the standard errors are NaN. Near a uniform ``p̄`` the
first-order SE of the predictive entropy goes to 0 while the true spread is second order (O(1/T)):
read small entropy SEs of near-uniform predictions with that in mind.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mcu._checks import check_int, check_number
from mcu.errors import InputError
from mcu.metrics._validation import as_numeric_array, check_positive_int, log_base
from mcu.metrics.classification import _probabilities_and_entropies

__all__ = [
    "DEFAULT_TS",
    "ConvergenceCurve",
    "convergence_curve",
    "mc_standard_errors",
    "smallest_sufficient_t",
]

DEFAULT_TS = (10, 20, 50, 100, 200)
"""The sample counts of the reference sample-count test."""

_SE_METHODS = ("delta", "bound")
_SE_NAMES = ("predictive_entropy", "expected_entropy", "mutual_information")


@dataclass(frozen=True)
class ConvergenceCurve:
    """A statistic estimated from the first t samples, for several t, with bootstrap standard errors.

    Attributes:
        ts: ``(K,)`` sample counts, increasing.
        estimates: ``(K, ...)`` the statistic on ``samples[:t]``.
        standard_errors: ``(K, ...)`` bootstrap Monte Carlo standard error of each estimate.
        n_bootstrap: Bootstrap replicates per t.
        seed: Seed of the bootstrap generator.
    """

    ts: np.ndarray
    estimates: np.ndarray
    standard_errors: np.ndarray
    n_bootstrap: int
    seed: int | None


def _check_ts(ts: Any, n_samples: int) -> np.ndarray:
    if ts is None:
        chosen = [t for t in DEFAULT_TS if t <= n_samples]
        if not chosen:
            raise InputError(
                f"samples: expected at least {DEFAULT_TS[0]} samples for the default ts={DEFAULT_TS}, "
                f"got T={n_samples}; pass ts explicitly, e.g. ts=(2, {n_samples})."
            )
        return np.array(chosen)
    values = [check_positive_int(t, "ts", minimum=2) for t in np.atleast_1d(np.asarray(ts, dtype=object))]
    if not values or any(b <= a for a, b in itertools.pairwise(values)):
        raise InputError(f"ts: expected a non-empty, strictly increasing sequence of sample counts, got {ts!r}.")
    if values[-1] > n_samples:
        raise InputError(
            f"ts: expected sample counts <= T={n_samples} (the samples given), got {values[-1]}; "
            "draw more samples or drop the larger counts."
        )
    return np.array(values)


def convergence_curve(
    samples: Any,
    ts: Any = None,
    *,
    statistic: Callable[[np.ndarray], Any],
    n_bootstrap: int = 200,
    seed: int | None = 0,
) -> ConvergenceCurve:
    """Evaluate ``statistic`` on the first t samples for each t, with a bootstrap standard error.

    The standard error for t is the standard deviation (ddof=1) of ``statistic`` over ``n_bootstrap``
    resamples of ``samples[:t]`` drawn with replacement along the samples axis: it estimates how much the
    estimate from t samples would vary between independent runs. The estimates use nested prefixes of one
    run, so successive points are correlated; a curve that flattens within its error bars says more
    samples would not change the answer.

    Args:
        samples: Monte Carlo samples, samples axis first.
        ts: Increasing sample counts, each in ``[2, T]``. ``None`` uses :data:`DEFAULT_TS`
            ``(10, 20, 50, 100, 200)`` cut at T.
        statistic: Function of a ``(t, N, ...)`` array returning a number or an array of a fixed shape,
            e.g. ``lambda s: predictive_entropy(s).mean()`` or ``lambda s: epistemic_std(s).mean()``.
        n_bootstrap: Bootstrap replicates per t (at least 2).
        seed: Seed of the bootstrap generator (``None`` for fresh entropy).

    Returns:
        A :class:`ConvergenceCurve`.

    Shape:
        samples: ``(T, N, ...)``. Returns: ``ts (K,)``, ``estimates`` and ``standard_errors (K, ...)``
        where ``...`` is the shape of ``statistic``'s result.

    Raises:
        InputError: invalid ``ts``, ``n_bootstrap < 2``, a ``statistic`` that is not callable, or
            ``samples`` with no samples axis; errors raised by ``statistic`` propagate.

    Example:
        A statistic that does not depend on the samples has converged at once:

        >>> import numpy as np
        >>> curve = convergence_curve(np.ones((4, 3)), ts=(2, 4), statistic=lambda s: s.mean())
        >>> curve.ts, curve.estimates, curve.standard_errors
        (array([2, 4]), array([1., 1.]), array([0., 0.]))
    """
    array = as_numeric_array(samples, "samples")
    if array.ndim == 0:
        raise InputError("samples: expected an array with a samples axis first (T, N, ...), got a scalar.")
    if not callable(statistic):
        raise InputError(f"statistic: expected a function of the samples, got {statistic!r}.")
    n_bootstrap = check_positive_int(n_bootstrap, "n_bootstrap", minimum=2)
    check_int(seed, "seed", minimum=0, allow_none=True)
    ts_arr = _check_ts(ts, array.shape[0])
    rng = np.random.default_rng(seed)
    estimates, errors = [], []
    for t in ts_arr:
        prefix = array[:t]
        estimates.append(np.asarray(statistic(prefix), dtype=np.float64))
        replicates = [statistic(prefix[rng.integers(0, t, size=t)]) for _ in range(n_bootstrap)]
        errors.append(np.std(np.asarray(replicates, dtype=np.float64), axis=0, ddof=1))
    return ConvergenceCurve(ts_arr, np.stack(estimates), np.stack(errors), n_bootstrap, seed)


def smallest_sufficient_t(curve: ConvergenceCurve, tol: float) -> int | None:
    """The smallest t of ``curve`` whose standard error is at most ``tol`` (every element, if an array).

    Args:
        curve: The output of :func:`convergence_curve`.
        tol: Largest acceptable Monte Carlo standard error, positive.

    Returns:
        That t, or ``None`` if no t of the curve is enough (draw more samples, then extend ``ts``).

    Shape:
        Not applicable (reads ``curve.ts (K,)`` and ``curve.standard_errors (K, ...)``).

    Raises:
        InputError: ``curve`` is not a :class:`ConvergenceCurve` or ``tol`` is not positive.

    Example:
        >>> import numpy as np
        >>> curve = ConvergenceCurve(np.array([10, 20, 50]), np.zeros(3), np.array([0.3, 0.2, 0.1]), 200, 0)
        >>> smallest_sufficient_t(curve, tol=0.25), smallest_sufficient_t(curve, tol=0.01)
        (20, None)
    """
    if not isinstance(curve, ConvergenceCurve):
        raise InputError(f"curve: expected a ConvergenceCurve (from convergence_curve), got {type(curve).__name__}.")
    check_number(tol, "tol", minimum=0, strict=True)
    worst = curve.standard_errors.reshape(len(curve.ts), -1).max(axis=1, initial=0.0)
    ok = np.flatnonzero(worst <= tol)
    return int(curve.ts[ok[0]]) if ok.size else None


def _neg_log(mean_probs: np.ndarray) -> np.ndarray:
    """``-log p̄_c``, with 0 where ``p̄_c = 0`` (then every ``p_tc = 0`` and the term vanishes)."""
    with np.errstate(divide="ignore"):
        return np.where(mean_probs > 0, -np.log(mean_probs), 0.0)


def _undefined(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """NaN standard errors: one sample says nothing about the spread."""
    return {name: np.full(shape, np.nan) for name in _SE_NAMES}


def _shifted_sd_bound(weights: np.ndarray, sds: np.ndarray) -> np.ndarray:
    """``min_lambda sum_c |w_c - lambda| sd_c`` per row: an upper bound on ``sd(sum_c w_c p_c)``.

    Valid for every ``lambda`` because ``sum_c p_c = 1`` makes the shift a constant; the minimiser is the
    ``sd``-weighted median of ``w`` (exact for two classes).

    Shape:
        weights, sds: ``(N, C)``. Returns: ``(N,)``.
    """
    order = np.argsort(weights, axis=-1)
    sorted_w, sorted_sd = np.take_along_axis(weights, order, -1), np.take_along_axis(sds, order, -1)
    cumulative = np.cumsum(sorted_sd, axis=-1)
    median_at = np.argmax(cumulative >= cumulative[..., -1:] / 2.0, axis=-1)[..., None]
    median = np.take_along_axis(sorted_w, median_at, -1)
    return np.sum(np.abs(weights - median) * sds, axis=-1)


def _entropy_se_from_moments(
    mean_probs: np.ndarray,
    var_entropy: np.ndarray,
    cov_probs_entropy: np.ndarray,
    n_samples: int,
    *,
    var_probs: np.ndarray | None = None,
    cov_probs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Standard errors in nats from ddof=1 moments over the samples (shared with the streaming accumulator).

    With the full covariance ``cov_probs`` this is the delta method; with only ``var_probs`` the variance of
    the linearised predictive entropy ``s`` is replaced by the upper bound of :func:`_shifted_sd_bound`.

    Shape:
        mean_probs, var_probs, cov_probs_entropy: ``(N, C)``; cov_probs: ``(N, C, C)``; var_entropy:
        ``(N,)``. Returns: three ``(N,)`` arrays.
    """
    if n_samples < 2:
        return _undefined(var_entropy.shape)
    weights = _neg_log(mean_probs)
    if cov_probs is not None:
        var_s = np.maximum(np.einsum("nc,ncd,nd->n", weights, cov_probs, weights), 0.0)
    else:
        var_s = _shifted_sd_bound(weights, np.sqrt(var_probs)) ** 2
    cov_s_h = np.sum(weights * cov_probs_entropy, axis=-1)
    var_mi = np.maximum(var_s + var_entropy - 2.0 * cov_s_h, 0.0)
    return {
        "predictive_entropy": np.sqrt(var_s / n_samples),
        "expected_entropy": np.sqrt(var_entropy / n_samples),
        "mutual_information": np.sqrt(var_mi / n_samples),
    }


def _entropy_se_delta(probs: np.ndarray, entropies: np.ndarray) -> dict[str, np.ndarray]:
    """The delta method computed directly from the linearised values ``s_t`` (dense path)."""
    n_samples = probs.shape[0]
    if n_samples < 2:
        return _undefined(entropies.shape[1:])
    linearised = np.sum(probs * _neg_log(probs.mean(axis=0)), axis=-1)  # s_t, (T, N)
    root_t = np.sqrt(n_samples)
    return {
        "predictive_entropy": linearised.std(axis=0, ddof=1) / root_t,
        "expected_entropy": entropies.std(axis=0, ddof=1) / root_t,
        "mutual_information": (linearised - entropies).std(axis=0, ddof=1) / root_t,
    }


def _entropy_se_bound(probs: np.ndarray, entropies: np.ndarray) -> dict[str, np.ndarray]:
    """The ``"bound"`` method from the O(N * C) moments (dense path, same formula as streaming)."""
    n_samples = probs.shape[0]
    if n_samples < 2:
        return _undefined(entropies.shape[1:])
    mean_probs = probs.mean(axis=0)
    entropy_dev = entropies - entropies.mean(axis=0)
    cov_probs_entropy = np.sum((probs - mean_probs) * entropy_dev[..., None], axis=0) / (n_samples - 1)
    return _entropy_se_from_moments(
        mean_probs,
        entropies.var(axis=0, ddof=1),
        cov_probs_entropy,
        n_samples,
        var_probs=probs.var(axis=0, ddof=1),
    )


def mc_standard_errors(
    samples: Any, *, from_logits: bool = False, base: float | None = None, method: str = "delta"
) -> dict[str, np.ndarray]:
    """Per-example Monte Carlo standard errors of the entropy-based classification metrics.

    See the module docstring for the two methods: ``"delta"`` (first-order delta method with the full
    sample covariance) and ``"bound"`` (an upper bound on it from per-class moments, what
    :class:`mcu.metrics.ClassificationAccumulator` reports by default).

    Args:
        samples: Probabilities or logits (see ``from_logits``).
        from_logits: Whether ``samples`` are logits.
        base: Logarithm base; ``None`` means natural log (same units as the metrics).
        method: ``"delta"`` or ``"bound"``.

    Returns:
        A dict with keys ``predictive_entropy``, ``expected_entropy`` and ``mutual_information``, each the
        standard error of the metric of that name; NaN when ``T = 1``.

    Shape:
        samples: ``(T, N, C)``. Values: ``(N,)``.

    Raises:
        InputError: an unknown ``method``, or see :func:`mcu.metrics.predictive_entropy`.

    Example:
        Per-sample entropies of 1 bit and 0 bits: their mean has standard error ``sd / sqrt(2) = 0.5``.

        >>> import numpy as np
        >>> s = np.array([[[0.5, 0.5]], [[1.0, 0.0]]])
        >>> mc_standard_errors(s, base=2)["expected_entropy"]
        array([0.5])
    """
    if method not in _SE_METHODS:
        raise InputError(f"method: expected one of {_SE_METHODS}, got {method!r}.")
    scale = log_base(base)
    probs, entropies = _probabilities_and_entropies(samples, from_logits)
    errors = (_entropy_se_delta if method == "delta" else _entropy_se_bound)(probs, entropies)
    return {name: value / scale for name, value in errors.items()}
