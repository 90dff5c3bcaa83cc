"""Memory-bounded accumulators: feed Monte Carlo samples in chunks, read the metrics at any time.

Used by ``mcu.predict`` so that T never has to fit in memory: the state is O(N * C) (classification) or
O(N * D) (regression) whatever T is. Moments are merged with the parallel (Chan et al.) form of
Welford's update in float64, so the results equal the dense functions of :mod:`mcu.metrics` on the
concatenated samples up to float round-off (the tests check 1e-6 for several chunkings).

Example:
    >>> import numpy as np
    >>> acc = ClassificationAccumulator(from_logits=False)
    >>> for chunk in (np.full((2, 1, 4), 0.25), np.full((3, 1, 4), 0.25)):
    ...     acc.update(chunk)
    >>> result = acc.result()
    >>> result["n_samples"], bool(np.isclose(result["predictive_entropy"][0], np.log(4)))
    (5, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mcu.errors import InputError
from mcu.metrics._validation import check_bool, log_base, validate_regression_samples
from mcu.metrics.classification import _argmax_counts, _probabilities_and_entropies, _summary
from mcu.metrics.convergence import _entropy_se_from_moments
from mcu.metrics.regression import _broadcast_noise_var

__all__ = ["ClassificationAccumulator", "RegressionAccumulator"]


class _Moments:
    """Running count, mean and co-moments along the samples axis (Chan's parallel form of Welford's update).

    Tracks, for features ``x`` of shape ``(..., K)``: the mean, the sums of squared deviations ``m2``, and
    optionally ``cross`` (sums of products of deviations of every feature with the last one) and ``full``
    (the ``(..., K, K)`` co-moment matrix).
    """

    def __init__(self, *, cross_last: bool = False, full: bool = False) -> None:
        self.n = 0
        self.cross_last, self.full_matrix = cross_last, full
        self.mean: Any = None
        self.m2: Any = None
        self.cross: Any = None
        self.full: Any = None

    def update(self, chunk: np.ndarray) -> None:
        """Merge the ``(t, ...)`` float64 ``chunk`` (t >= 1) into the running moments."""
        n_b = chunk.shape[0]
        mean_b = chunk.mean(axis=0)
        dev = chunk - mean_b
        moments_b = {"m2": np.sum(dev**2, axis=0)}
        if self.cross_last:
            moments_b["cross"] = np.sum(dev * dev[..., -1:], axis=0)
        if self.full_matrix:
            moments_b["full"] = np.einsum("t...i,t...j->...ij", dev, dev)
        if self.n == 0:
            self.n, self.mean = n_b, mean_b
            for name, value in moments_b.items():
                setattr(self, name, value)
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        weight = self.n * n_b / n
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + moments_b["m2"] + delta**2 * weight
        if self.cross_last:
            self.cross = self.cross + moments_b["cross"] + delta * delta[..., -1:] * weight
        if self.full_matrix:
            self.full = self.full + moments_b["full"] + delta[..., :, None] * delta[..., None, :] * weight
        self.n = n

    def variance(self, ddof: int = 0) -> np.ndarray:
        return self.m2 / (self.n - ddof)


def _check_started(n: int, owner: str) -> None:
    if n == 0:
        raise InputError(f"{owner}: expected at least one update(chunk) before reading results, got none.")


def _check_same_shape(shape: tuple[int, ...] | None, new: tuple[int, ...], layout: str) -> None:
    if shape is not None and new != shape:
        raise InputError(f"chunk: expected {layout} with the per-sample shape {shape} of the first chunk, got {new}.")


class ClassificationAccumulator:
    """Streaming classification metrics over chunks of Monte Carlo samples.

    The state is O(N * C), float64, whatever the number of samples: the running mean and squared
    deviations of the probabilities (``mean_probabilities``, ``predictive_variance``) and of the
    per-sample entropies (``expected_entropy``), their cross-deviations (for the mutual-information
    standard error), and per-class counts of the argmax label (``variation_ratio``).

    With ``exact_standard_errors=True`` the full C x C co-moment of the probabilities is kept as well,
    O(N * C^2) memory, and :meth:`standard_error` gives the delta-method values of
    :func:`mcu.metrics.mc_standard_errors` instead of its conservative ``"bound"`` (see
    :mod:`mcu.metrics.convergence`). Affordable for tens of classes; for hundreds, keep the default.

    Args:
        from_logits: Whether chunks are logits (a stable softmax is applied) or probabilities (checked).
        base: Logarithm base of the entropies; ``None`` means natural log.
        exact_standard_errors: Keep the full covariance for delta-method standard errors.

    Shape:
        chunk: ``(t, N, C)`` with the same N and C for every chunk. Results: as the functions of
        :mod:`mcu.metrics.classification`.

    Example:
        Two samples that disagree confidently carry one bit of mutual information:

        >>> import numpy as np
        >>> acc = ClassificationAccumulator(from_logits=False, base=2)
        >>> acc.update(np.array([[[1.0, 0.0]]]))
        >>> acc.update(np.array([[[0.0, 1.0]]]))
        >>> acc.result()["mutual_information"], acc.result()["variation_ratio"]
        (array([1.]), array([0.5]))
    """

    def __init__(self, from_logits: bool, *, base: float | None = None, exact_standard_errors: bool = False) -> None:
        check_bool(from_logits, "from_logits")
        check_bool(exact_standard_errors, "exact_standard_errors")
        log_base(base)
        self.from_logits = bool(from_logits)
        self.base = base
        self.exact_standard_errors = bool(exact_standard_errors)
        # features per example: the C probabilities followed by the sample's entropy (nats)
        self._moments = _Moments(cross_last=True, full=self.exact_standard_errors)
        self._counts: np.ndarray | None = None
        self._shape: tuple[int, ...] | None = None

    @property
    def n_samples(self) -> int:
        """Samples seen so far (T)."""
        return self._moments.n

    def update(self, chunk: Any) -> None:
        """Add a chunk of raw outputs: logits if ``from_logits`` else probabilities.

        Shape:
            chunk: ``(t, N, C)``, t >= 1.
        """
        probs, entropies = _probabilities_and_entropies(chunk, self.from_logits, "chunk")
        _check_same_shape(self._shape, probs.shape[1:], "(t, N, C)")
        self._shape = probs.shape[1:]
        self._moments.update(np.concatenate([probs, entropies[..., None]], axis=-1))
        counts = _argmax_counts(probs)
        self._counts = counts if self._counts is None else self._counts + counts

    def result(self) -> dict[str, Any]:
        """The metrics so far, keyed like :func:`mcu.metrics.classification_summary`.

        Returns:
            ``mean_probabilities (N, C)``, ``predictive_entropy (N,)``, ``expected_entropy (N,)``,
            ``mutual_information (N,)``, ``variation_ratio (N,)``, ``margin (N,)``, ``max_probability (N,)``,
            ``predictive_variance (N, C)`` (ddof=0) and ``n_samples`` (int).
        """
        _check_started(self.n_samples, "ClassificationAccumulator")
        m = self._moments
        return _summary(
            m.mean[..., :-1].copy(), m.m2[..., :-1], m.mean[..., -1], self._counts, self.n_samples, self.base
        )

    def standard_error(self, name: str) -> np.ndarray:
        """Per-example Monte Carlo standard error of the metric ``name``, from the running moments.

        ``mean_probabilities``: ``sd_t(p_tc) / sqrt(T)`` (ddof=1), shape ``(N, C)``. ``expected_entropy``:
        ``sd_t(H(p_t)) / sqrt(T)``, exact. ``predictive_entropy`` and ``mutual_information``: the
        conservative ``"bound"`` of :func:`mcu.metrics.mc_standard_errors` (never below the first-order
        delta-method value), or the delta method itself with ``exact_standard_errors=True``. NaN while
        ``T = 1``.

        Args:
            name: ``mean_probabilities``, ``predictive_entropy``, ``expected_entropy`` or
                ``mutual_information``.

        Returns:
            The standard errors, float64, in the units of the metric.
        """
        _check_started(self.n_samples, "ClassificationAccumulator")
        n, m = self.n_samples, self._moments
        if name == "mean_probabilities":
            return np.sqrt(m.variance(ddof=1)[..., :-1] / n) if n > 1 else np.full(self._shape, np.nan)
        if name not in ("predictive_entropy", "expected_entropy", "mutual_information"):
            raise InputError(
                "name: expected one of 'mean_probabilities', 'predictive_entropy', 'expected_entropy', "
                f"'mutual_information', got {name!r}."
            )
        if n < 2:
            return np.full(self._shape[:1], np.nan)
        scaled = (
            {"cov_probs": m.full[..., :-1, :-1] / (n - 1)}
            if self.exact_standard_errors
            else {"var_probs": m.variance(ddof=1)[..., :-1]}
        )
        errors = _entropy_se_from_moments(
            m.mean[..., :-1], m.variance(ddof=1)[..., -1], m.cross[..., :-1] / (n - 1), n, **scaled
        )
        return errors[name] / log_base(self.base)


class RegressionAccumulator:
    """Streaming regression summaries over chunks of Monte Carlo samples (Welford/Chan, float64).

    Chunk layout:

    * ``heteroscedastic=False``: ``(t, N, ...)``, the predicted values; optional homoscedastic
      ``noise_var`` (non-negative, broadcastable to ``(N, ...)``) is added to the total variance.
    * ``heteroscedastic=True``: ``(t, N, ..., 2)``, the last axis holding ``[mean, log_var]`` of each
      sample; the aleatoric variance is ``mean_t exp(log_var_t)``.

    Args:
        heteroscedastic: Whether chunks carry a predicted log-variance in a last axis of size 2.
        noise_var: Homoscedastic noise variance (only with ``heteroscedastic=False``).

    Shape:
        chunk: as above, the same per-sample shape for every chunk. Results: ``(N, ...)``.

    Example:
        >>> import numpy as np
        >>> acc = RegressionAccumulator(noise_var=0.5)
        >>> acc.update(np.array([[1.0]]))
        >>> acc.update(np.array([[3.0]]))
        >>> r = acc.result()
        >>> r["predictive_mean"], r["epistemic_variance"], r["total_variance"]
        (array([2.]), array([1.]), array([1.5]))
    """

    def __init__(self, heteroscedastic: bool = False, noise_var: Any = None) -> None:
        check_bool(heteroscedastic, "heteroscedastic")
        if heteroscedastic and noise_var is not None:
            raise InputError(
                "noise_var: expected None with heteroscedastic=True (the chunks carry the noise), got a value."
            )
        if noise_var is not None:
            _broadcast_noise_var(noise_var, np.shape(noise_var))  # value checks now, shape at the first chunk
        self.heteroscedastic = bool(heteroscedastic)
        self.noise_var = noise_var
        self._values = _Moments()
        self._noise = _Moments()  # only its mean, of exp(log_var), is used
        self._shape: tuple[int, ...] | None = None

    @property
    def n_samples(self) -> int:
        """Samples seen so far (T)."""
        return self._values.n

    def update(self, chunk: Any) -> None:
        """Add a chunk of raw outputs (see the class docstring for the layout).

        Shape:
            chunk: ``(t, N, ...)`` or, heteroscedastic, ``(t, N, ..., 2)``; t >= 1.
        """
        array = validate_regression_samples(chunk, "chunk")
        if self.heteroscedastic and (array.ndim < 3 or array.shape[-1] != 2):
            raise InputError(
                f"chunk: expected (t, N, ..., 2) with the last axis [mean, log_var] (heteroscedastic=True), "
                f"got shape {array.shape}."
            )
        _check_same_shape(self._shape, array.shape[1:], "(t, N, ...)")
        if self._shape is None and self.noise_var is not None:
            _broadcast_noise_var(self.noise_var, array.shape[1:])
        self._shape = array.shape[1:]
        if self.heteroscedastic:
            self._values.update(array[..., 0])
            self._noise.update(np.exp(array[..., 1]))
        else:
            self._values.update(array)

    def _aleatoric(self) -> np.ndarray:
        if self.heteroscedastic:
            return self._noise.mean
        if self.noise_var is None:
            return np.zeros_like(self._values.mean)
        return _broadcast_noise_var(self.noise_var, self._values.mean.shape)

    def result(self) -> dict[str, Any]:
        """The summaries so far, keyed by the names of the functions in :mod:`mcu.metrics.regression`.

        Returns:
            ``predictive_mean``, ``epistemic_variance`` (ddof=0), ``epistemic_std``, ``aleatoric_variance``,
            ``total_variance``, ``total_std`` (each ``(N, ...)``) and ``n_samples`` (int).
        """
        _check_started(self.n_samples, "RegressionAccumulator")
        epistemic = self._values.variance()
        aleatoric = self._aleatoric()
        total = epistemic + aleatoric
        return {
            "predictive_mean": self._values.mean.copy(),
            "epistemic_variance": epistemic,
            "epistemic_std": np.sqrt(epistemic),
            "aleatoric_variance": aleatoric,
            "total_variance": total,
            "total_std": np.sqrt(total),
            "n_samples": self.n_samples,
        }

    def standard_error(self, name: str = "predictive_mean") -> np.ndarray:
        """Monte Carlo standard error of the predictive mean, ``sd_t(y_t) / sqrt(T)`` (ddof=1); NaN at T=1.

        Args:
            name: ``"predictive_mean"`` (the only supported name).

        Returns:
            The standard errors, ``(N, ...)``.
        """
        _check_started(self.n_samples, "RegressionAccumulator")
        if name != "predictive_mean":
            raise InputError(f"name: expected 'predictive_mean', got {name!r}.")
        n = self.n_samples
        if n < 2:
            return np.full(self._values.mean.shape, np.nan)
        return np.sqrt(self._values.variance(ddof=1) / n)
