"""Predictive mean, variance and intervals of a regressor from Monte Carlo samples of its outputs.

``samples`` has shape ``(T, N, ...)``: T stochastic forward passes (samples axis first), N examples, and
any trailing output dimensions. Variances over the samples are population variances (``ddof=0``, divide
by T) everywhere in mcu; standard errors of a mean use the sample variance (``ddof=1``).

The aleatoric (data-noise) part of the variance comes from one of:

* ``noise_var``: homoscedastic noise, a non-negative scalar or an array broadcastable to ``(N, ...)``;
* ``log_var_samples``: heteroscedastic noise, the model's predicted log-variance for every sample, shaped
  like ``samples``; the aleatoric variance is ``mean_t exp(log_var_t)``.

Total variance = aleatoric variance + epistemic variance (the law of total variance for the mixture of
the T Gaussians ``N(mu_t, sigma_t^2)``).

Split-conformal recalibration (:class:`ConformalIntervalCalibrator`) turns any ``mean +- k * std`` band
into one with a finite-sample coverage guarantee on exchangeable data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import norm

from mcu.errors import InputError
from mcu.metrics._validation import (
    as_float_array,
    check_finite,
    check_level,
    check_same_shape,
    validate_regression_samples,
)

__all__ = [
    "ConformalIntervalCalibrator",
    "aleatoric_variance",
    "conformal_interval",
    "conformal_scale",
    "epistemic_std",
    "epistemic_variance",
    "gaussian_interval",
    "interval_coverage",
    "mean_interval_width",
    "predictive_mean",
    "predictive_mean_standard_error",
    "quantile_interval",
    "total_std",
    "total_variance",
]


def predictive_mean(samples: Any) -> np.ndarray:
    """Mean prediction over the Monte Carlo samples, ``mean_t y_t``.

    Args:
        samples: Regression outputs of T stochastic passes.

    Returns:
        The predictive mean, float64.

    Shape:
        samples: ``(T, N, ...)``. Returns: ``(N, ...)``.

    Raises:
        InputError: fewer than 2 dimensions, ``T = 0``, or NaN/inf.

    Example:
        >>> import numpy as np
        >>> predictive_mean(np.array([[1.0, 2.0], [3.0, 6.0]]))
        array([2., 4.])
    """
    return validate_regression_samples(samples).mean(axis=0)


def epistemic_variance(samples: Any) -> np.ndarray:
    """Variance of the predictions over the samples (model uncertainty), ``mean_t (y_t - ȳ)^2``, ddof=0.

    Args:
        samples: Regression outputs of T stochastic passes.

    Returns:
        The epistemic variance, float64; 0 when ``T = 1``.

    Shape:
        samples: ``(T, N, ...)``. Returns: ``(N, ...)``.

    Raises:
        InputError: see :func:`predictive_mean`.

    Example:
        >>> import numpy as np
        >>> epistemic_variance(np.array([[1.0, 2.0], [3.0, 6.0]]))
        array([1., 4.])
    """
    return validate_regression_samples(samples).var(axis=0)


def epistemic_std(samples: Any) -> np.ndarray:
    """Square root of :func:`epistemic_variance` (ddof=0).

    Args:
        samples: Regression outputs of T stochastic passes.

    Returns:
        The epistemic standard deviation, float64.

    Shape:
        samples: ``(T, N, ...)``. Returns: ``(N, ...)``.

    Raises:
        InputError: see :func:`predictive_mean`.

    Example:
        >>> import numpy as np
        >>> epistemic_std(np.array([[1.0, 2.0], [3.0, 6.0]]))
        array([1., 2.])
    """
    return np.sqrt(epistemic_variance(samples))


def predictive_mean_standard_error(samples: Any) -> np.ndarray:
    """Monte Carlo standard error of :func:`predictive_mean`: ``std_t(y_t, ddof=1) / sqrt(T)``.

    How far the mean of T samples is likely to be from the mean of infinitely many. NaN when ``T = 1``
    (the spread cannot be estimated from one sample).

    Args:
        samples: Regression outputs of T stochastic passes.

    Returns:
        The standard error of each predictive mean, float64.

    Shape:
        samples: ``(T, N, ...)``. Returns: ``(N, ...)``.

    Raises:
        InputError: see :func:`predictive_mean`.

    Example:
        >>> import numpy as np
        >>> predictive_mean_standard_error(np.array([[0.0], [2.0]]))   # std (ddof=1) sqrt(2), T=2
        array([1.])
    """
    array = validate_regression_samples(samples)
    n = array.shape[0]
    if n < 2:
        return np.full(array.shape[1:], np.nan)
    return np.sqrt(array.var(axis=0, ddof=1) / n)


def aleatoric_variance(samples: Any, *, noise_var: Any = None, log_var_samples: Any = None) -> np.ndarray:
    """The data-noise variance: ``noise_var`` broadcast to ``(N, ...)``, or ``mean_t exp(log_var_t)``.

    Args:
        samples: Regression outputs of T stochastic passes (used for the output shape).
        noise_var: Homoscedastic noise variance, non-negative, broadcastable to ``(N, ...)``.
        log_var_samples: Heteroscedastic predicted log-variances, shaped like ``samples``.

    Returns:
        The aleatoric variance, float64; zeros if neither ``noise_var`` nor ``log_var_samples`` is given.

    Shape:
        samples, log_var_samples: ``(T, N, ...)``. Returns: ``(N, ...)``.

    Raises:
        InputError: both noise arguments given, a negative or non-finite ``noise_var``, a ``noise_var`` not
            broadcastable to ``(N, ...)``, or ``log_var_samples`` of another shape than ``samples``.

    Example:
        >>> import numpy as np
        >>> aleatoric_variance(np.zeros((2, 1)), log_var_samples=np.log([[1.0], [3.0]]))
        array([2.])
    """
    array = validate_regression_samples(samples)
    return _aleatoric(array, noise_var, log_var_samples)


def _aleatoric(array: np.ndarray, noise_var: Any, log_var_samples: Any) -> np.ndarray:
    out_shape = array.shape[1:]
    if noise_var is not None and log_var_samples is not None:
        raise InputError(
            "noise_var: expected None when log_var_samples is given (homoscedastic or heteroscedastic "
            "noise, not both), got both."
        )
    if log_var_samples is not None:
        log_var = validate_regression_samples(log_var_samples, "log_var_samples")
        check_same_shape(array, "samples", log_var, "log_var_samples")
        return np.exp(log_var).mean(axis=0)
    if noise_var is None:
        return np.zeros(out_shape)
    return _broadcast_noise_var(noise_var, out_shape)


def _broadcast_noise_var(noise_var: Any, out_shape: tuple[int, ...]) -> np.ndarray:
    noise = as_float_array(noise_var, "noise_var")
    check_finite(noise, "noise_var")
    if (noise < 0).any():
        raise InputError(f"noise_var: expected non-negative variances, got a minimum of {noise.min().item()!r}.")
    try:
        return np.broadcast_to(noise, out_shape).astype(np.float64)
    except ValueError:
        raise InputError(
            f"noise_var: expected a scalar or an array broadcastable to {out_shape} (N, ...), got shape {noise.shape}."
        ) from None


def total_variance(samples: Any, *, noise_var: Any = None, log_var_samples: Any = None) -> np.ndarray:
    """Total predictive variance: aleatoric variance + epistemic variance (ddof=0).

    ``noise_var + var_t y_t`` (homoscedastic) or ``mean_t exp(log_var_t) + var_t y_t`` (heteroscedastic).
    With neither noise argument it equals :func:`epistemic_variance`.

    Args:
        samples: Predicted means of T stochastic passes.
        noise_var: Homoscedastic noise variance, non-negative, broadcastable to ``(N, ...)``.
        log_var_samples: Heteroscedastic predicted log-variances, shaped like ``samples``.

    Returns:
        The total variance, float64.

    Shape:
        samples, log_var_samples: ``(T, N, ...)``. Returns: ``(N, ...)``.

    Raises:
        InputError: see :func:`aleatoric_variance`.

    Example:
        >>> import numpy as np
        >>> total_variance(np.array([[1.0], [3.0]]), noise_var=0.5)   # 0.5 + var([1, 3])
        array([1.5])
    """
    array = validate_regression_samples(samples)
    return _aleatoric(array, noise_var, log_var_samples) + array.var(axis=0)


def total_std(samples: Any, *, noise_var: Any = None, log_var_samples: Any = None) -> np.ndarray:
    """Square root of :func:`total_variance`.

    Args:
        samples: Predicted means of T stochastic passes.
        noise_var: Homoscedastic noise variance.
        log_var_samples: Heteroscedastic predicted log-variances, shaped like ``samples``.

    Returns:
        The total predictive standard deviation, float64.

    Shape:
        samples, log_var_samples: ``(T, N, ...)``. Returns: ``(N, ...)``.

    Raises:
        InputError: see :func:`aleatoric_variance`.

    Example:
        >>> import numpy as np
        >>> total_std(np.array([[1.0], [3.0]]), noise_var=3.0)
        array([2.])
    """
    return np.sqrt(total_variance(samples, noise_var=noise_var, log_var_samples=log_var_samples))


def gaussian_interval(
    samples: Any, level: float = 0.95, *, noise_var: Any = None, log_var_samples: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Central interval of a Gaussian with the predictive mean and total variance.

    ``mean -+ z * sqrt(total_variance)`` with ``z = Phi^-1((1 + level) / 2)`` (1.96 for 0.95). This
    moment-matches the mixture of the T sample Gaussians; it is exact only if the predictive distribution
    is Gaussian. Use :class:`ConformalIntervalCalibrator` to recalibrate it on held-out data.

    Args:
        samples: Predicted means of T stochastic passes.
        level: Nominal coverage, strictly between 0 and 1.
        noise_var: Homoscedastic noise variance (see :func:`total_variance`).
        log_var_samples: Heteroscedastic predicted log-variances, shaped like ``samples``.

    Returns:
        ``(lower, upper)``, float64 arrays.

    Shape:
        samples, log_var_samples: ``(T, N, ...)``. Returns: two arrays ``(N, ...)``.

    Raises:
        InputError: a ``level`` outside (0, 1), or see :func:`aleatoric_variance`.

    Example:
        With mean 0 and variance 1, the 68.27 % interval is about [-1, 1]:

        >>> import numpy as np
        >>> from scipy.stats import norm
        >>> lower, upper = gaussian_interval(np.array([[-1.0], [1.0]]), level=norm.cdf(1) - norm.cdf(-1))
        >>> bool(np.allclose(lower, -1.0) and np.allclose(upper, 1.0))
        True
    """
    z = norm.ppf(0.5 + check_level(level) / 2.0)
    mean = predictive_mean(samples)
    half_width = z * total_std(samples, noise_var=noise_var, log_var_samples=log_var_samples)
    return mean - half_width, mean + half_width


def quantile_interval(samples: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Central interval from the empirical quantiles of the samples over T.

    The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles, linearly interpolated between order
    statistics (``numpy.quantile``'s default method). It covers epistemic spread only; add noise to the
    samples first if aleatoric noise should be included.

    Args:
        samples: Regression outputs of T stochastic passes.
        level: Nominal coverage, strictly between 0 and 1.

    Returns:
        ``(lower, upper)``, float64 arrays.

    Shape:
        samples: ``(T, N, ...)``. Returns: two arrays ``(N, ...)``.

    Raises:
        InputError: a ``level`` outside (0, 1), or see :func:`predictive_mean`.

    Example:
        >>> import numpy as np
        >>> lower, upper = quantile_interval(np.arange(101.0).reshape(101, 1), level=0.9)
        >>> lower, upper
        (array([5.]), array([95.]))
    """
    level = check_level(level)
    array = validate_regression_samples(samples)
    lower, upper = np.quantile(array, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)
    return lower, upper


def _interval_inputs(y: Any, lower: Any, upper: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_arr, lo, hi = (as_float_array(a, n) for a, n in ((y, "y"), (lower, "lower"), (upper, "upper")))
    for array, name in ((y_arr, "y"), (lo, "lower"), (hi, "upper")):
        check_finite(array, name)
    check_same_shape(lo, "lower", hi, "upper")
    if (hi < lo).any():
        raise InputError(f"upper: expected upper >= lower everywhere, got {int((hi < lo).sum())} violation(s).")
    return y_arr, lo, hi


def interval_coverage(y: Any, lower: Any, upper: Any) -> float:
    """Fraction of targets inside their interval, ``mean(lower <= y <= upper)`` (closed interval).

    Args:
        y: Observed targets.
        lower: Lower interval ends, same shape as ``y``.
        upper: Upper interval ends, same shape as ``y``.

    Returns:
        The empirical coverage, a float in [0, 1].

    Shape:
        y, lower, upper: any shape ``(N, ...)``, all equal, at least one element. Returns: scalar.

    Raises:
        InputError: shapes differ, no targets, NaN/inf, or ``upper < lower`` somewhere.

    Example:
        >>> interval_coverage([0.0, 5.0], lower=[-1.0, -1.0], upper=[1.0, 1.0])
        0.5
    """
    y_arr, lo, hi = _interval_inputs(y, lower, upper)
    check_same_shape(lo, "lower", y_arr, "y")
    if y_arr.size == 0:
        raise InputError("y: expected at least one target, got an empty array.")
    return float(np.mean((lo <= y_arr) & (y_arr <= hi)))


def mean_interval_width(lower: Any, upper: Any) -> float:
    """Mean of ``upper - lower``.

    Args:
        lower: Lower interval ends.
        upper: Upper interval ends, same shape as ``lower``.

    Returns:
        The mean width, a float.

    Shape:
        lower, upper: any shape, equal, at least one element. Returns: scalar.

    Raises:
        InputError: shapes differ, no intervals, NaN/inf, or ``upper < lower`` somewhere.

    Example:
        >>> mean_interval_width([0.0, 1.0], [2.0, 5.0])
        3.0
    """
    _, lo, hi = _interval_inputs(0.0, lower, upper)
    if lo.size == 0:
        raise InputError("lower: expected at least one interval, got an empty array.")
    return float(np.mean(hi - lo))


def conformal_scale(mean: Any, std: Any, y: Any, level: float = 0.95) -> float:
    """Split-conformal scale factor ``q`` for intervals ``mean -+ q * std``.

    With nonconformity scores ``s_i = |y_i - mean_i| / std_i`` on n held-out points, ``q`` is the
    ``k``-th smallest score with ``k = ceil((n + 1) * level)``. For a new point exchangeable with the
    held-out ones, ``P(|y - mean| <= q * std) >= level`` (Lei et al., 2018). All elements of ``y`` are
    treated as separate points (a multi-output ``(N, D)`` array gives ``n = N * D`` scores).

    Args:
        mean: Predictive means on the held-out data.
        std: Predictive standard deviations, strictly positive, broadcastable to ``mean`` (a scalar works).
        y: Held-out targets, same shape as ``mean``.
        level: Target coverage, strictly between 0 and 1.

    Returns:
        The scale factor ``q`` (a float; compare with 1.96 for a Gaussian 95 % interval).

    Shape:
        mean, y: ``(N, ...)``; std: broadcastable to it. Returns: scalar.

    Raises:
        InputError: shape mismatch, NaN/inf, ``std <= 0``, or fewer than ``ceil(level / (1 - level))``
            points (then ``k > n`` and only an infinite interval has the guarantee).

    Example:
        Scores 1, 2, ..., 9; ``k = ceil(10 * 0.5) = 5``:

        >>> import numpy as np
        >>> conformal_scale(np.zeros(9), 1.0, np.arange(1.0, 10.0), level=0.5)
        5.0
    """
    level = check_level(level)
    scores = _scores(mean, std, y).ravel()
    n = scores.size
    # The 1e-9 guards against (n + 1) * level landing a hair above an integer in binary (0.9 * 10).
    k = math.ceil((n + 1) * level - 1e-9)
    if k > n:
        raise InputError(
            f"y: expected at least {math.ceil(level / (1.0 - level) - 1e-9)} calibration points for "
            f"level={level}, got {n}; use more held-out data or a lower level."
        )
    return float(np.partition(scores, k - 1)[k - 1])


def _scores(mean: Any, std: Any, y: Any) -> np.ndarray:
    mean_arr, y_arr = as_float_array(mean, "mean"), as_float_array(y, "y")
    check_same_shape(mean_arr, "mean", y_arr, "y")
    std_arr = _std(std, mean_arr.shape)
    check_finite(mean_arr, "mean")
    check_finite(y_arr, "y")
    return np.abs(y_arr - mean_arr) / std_arr


def _std(std: Any, shape: tuple[int, ...]) -> np.ndarray:
    std_arr = as_float_array(std, "std")
    check_finite(std_arr, "std")
    if (std_arr <= 0).any():
        raise InputError(f"std: expected strictly positive values, got a minimum of {std_arr.min().item()!r}.")
    try:
        return np.broadcast_to(std_arr, shape)
    except ValueError:
        raise InputError(f"std: expected a shape broadcastable to {shape}, got {std_arr.shape}.") from None


def conformal_interval(mean: Any, std: Any, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The interval ``mean -+ scale * std`` (apply a :func:`conformal_scale` to new data).

    Args:
        mean: Predictive means.
        std: Predictive standard deviations, strictly positive, broadcastable to ``mean``.
        scale: The factor ``q``, a non-negative number.

    Returns:
        ``(lower, upper)``, float64 arrays of the shape of ``mean``.

    Shape:
        mean: ``(N, ...)``; std: broadcastable to it. Returns: two arrays ``(N, ...)``.

    Raises:
        InputError: NaN/inf, ``std <= 0``, or a negative or non-finite ``scale``.

    Example:
        >>> conformal_interval([0.0, 10.0], 2.0, scale=1.5)
        (array([-3.,  7.]), array([ 3., 13.]))
    """
    mean_arr = as_float_array(mean, "mean")
    check_finite(mean_arr, "mean")
    std_arr = _std(std, mean_arr.shape)
    if not (np.isscalar(scale) and np.isfinite(scale) and scale >= 0):
        raise InputError(f"scale: expected a finite non-negative number, got {scale!r}.")
    return mean_arr - scale * std_arr, mean_arr + scale * std_arr


class ConformalIntervalCalibrator:
    """Split-conformal recalibration of ``mean -+ k * std`` intervals.

    Fit on held-out ``(mean, std, y)`` to learn the scale ``q`` (:func:`conformal_scale`), then call
    :meth:`interval` on new data. Any uncertainty estimate works as ``std`` (epistemic, total, ...):
    conformal calibration fixes its scale, not its ranking.

    Args:
        level: Target coverage, strictly between 0 and 1.

    Attributes:
        level: The target coverage.
        scale_: The fitted scale factor ``q`` (``None`` before :meth:`fit`).
        n_calibration_: Number of held-out points used.

    Example:
        >>> import numpy as np
        >>> cal = ConformalIntervalCalibrator(level=0.5).fit(np.zeros(9), 1.0, np.arange(1.0, 10.0))
        >>> cal.scale_
        5.0
        >>> cal.interval(np.array([0.0]), np.array([2.0]))
        (array([-10.]), array([10.]))
    """

    def __init__(self, level: float = 0.95) -> None:
        self.level = check_level(level)
        self.scale_: float | None = None
        self.n_calibration_: int = 0

    def fit(self, mean: Any, std: Any, y: Any) -> ConformalIntervalCalibrator:
        """Learn ``scale_`` from held-out data; returns ``self``.

        Shape:
            mean, y: ``(N, ...)``; std: broadcastable to it.
        """
        self.scale_ = conformal_scale(mean, std, y, self.level)
        self.n_calibration_ = int(np.size(y))
        return self

    def fit_samples(
        self, samples: Any, y: Any, *, noise_var: Any = None, log_var_samples: Any = None
    ) -> ConformalIntervalCalibrator:
        """:meth:`fit` from Monte Carlo samples: mean = :func:`predictive_mean`, std = :func:`total_std`.

        Shape:
            samples, log_var_samples: ``(T, N, ...)``; y: ``(N, ...)``.
        """
        std = total_std(samples, noise_var=noise_var, log_var_samples=log_var_samples)
        return self.fit(predictive_mean(samples), std, y)

    def interval(self, mean: Any, std: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(mean - scale_ * std, mean + scale_ * std)`` for new data.

        Shape:
            mean: ``(N, ...)``; std: broadcastable to it. Returns: two arrays ``(N, ...)``.
        """
        if self.scale_ is None:
            raise InputError("ConformalIntervalCalibrator: expected fit(...) before interval(...), got no fit.")
        return conformal_interval(mean, std, self.scale_)

    def interval_samples(
        self, samples: Any, *, noise_var: Any = None, log_var_samples: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`interval` from Monte Carlo samples, with the same mean and std as :meth:`fit_samples`.

        Shape:
            samples, log_var_samples: ``(T, N, ...)``. Returns: two arrays ``(N, ...)``.
        """
        std = total_std(samples, noise_var=noise_var, log_var_samples=log_var_samples)
        return self.interval(predictive_mean(samples), std)

    def __repr__(self) -> str:
        return f"ConformalIntervalCalibrator(level={self.level}, scale_={self.scale_})"
