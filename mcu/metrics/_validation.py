"""Shared argument checks for :mod:`mcu.metrics`.

Every check raises :class:`mcu.errors.InputError` with a message of the form
``"<argument>: expected <what>, got <what was given>."`` so the caller can see which argument to fix.
Checks never modify their input; the ``as_*`` helpers return a float64 (or int64) copy or view.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from mcu._checks import check_bool, check_int, check_number
from mcu._checks import fail as _fail

__all__ = [
    "as_float_array",
    "as_labels",
    "as_numeric_array",
    "check_axis_nonempty",
    "check_bool",
    "check_finite",
    "check_level",
    "check_ndim",
    "check_positive_int",
    "check_probabilities",
    "check_same_shape",
    "log_base",
    "prob_sum_atol",
    "validate_classification_samples",
    "validate_regression_samples",
]

_NUMERIC_KINDS = "biuf"


def as_numeric_array(value: Any, argument: str) -> np.ndarray:
    """``value`` as a numpy array of real numbers (bool, int or float), dtype unchanged."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise _fail(argument, "an array of real numbers", f"{type(value).__name__} ({exc})") from exc
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise _fail(argument, "an array of real numbers", f"dtype {array.dtype}")
    return array


def as_float_array(value: Any, argument: str) -> np.ndarray:
    """``value`` as a numpy float64 array; raise unless it is real-valued numeric data."""
    return as_numeric_array(value, argument).astype(np.float64, copy=False)


def check_ndim(array: np.ndarray, argument: str, ndim: int, layout: str, *, at_least: bool = False) -> None:
    """Raise unless ``array.ndim == ndim`` (or ``>= ndim`` with ``at_least``); ``layout`` reads like ``(T, N, C)``."""
    ok = array.ndim >= ndim if at_least else array.ndim == ndim
    if not ok:
        rank = f"an array of at least {ndim} dimensions" if at_least else f"a {ndim}-D array"
        raise _fail(argument, f"{rank} {layout}", f"shape {array.shape}")


def check_finite(array: np.ndarray, argument: str) -> None:
    """Raise if ``array`` holds NaN or +/-inf, saying how many and where the first one is."""
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise _fail(
            argument,
            "finite values",
            f"{int(bad.sum())} non-finite value(s), the first {array[first].item()!r} at index {first}",
        )


def check_axis_nonempty(array: np.ndarray, argument: str, axis: int, name: str) -> None:
    """Raise if ``array.shape[axis] == 0``; ``name`` describes the axis (``"samples (T)"``)."""
    if array.shape[axis] == 0:
        raise _fail(argument, f"at least one entry along axis {axis} ({name})", f"shape {array.shape}")


def prob_sum_atol(n_classes: int, dtype: np.dtype) -> float:
    """Tolerance on ``|sum_c p_c - 1|``: ``max(1e-4, 8 * C * eps(dtype))``.

    ``1e-4`` accepts probabilities computed in float32 and then cast to float64 (common after a framework
    softmax); the ``C * eps`` term widens it for many classes in low precision (float16). It is far below
    what an unnormalised score or a logit would give, which is what the check is for.
    """
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else np.finfo(np.float64).eps
    return max(1e-4, 8.0 * n_classes * float(eps))


def check_probabilities(array: np.ndarray, argument: str, *, input_dtype: np.dtype | None = None) -> None:
    """Raise unless every entry is in [0, 1] and every row (last axis) sums to 1 within :func:`prob_sum_atol`.

    Probabilities are never renormalised: a row that does not sum to one is a caller error (often logits
    passed without ``from_logits=True``).
    """
    check_finite(array, argument)
    outside = (array < 0) | (array > 1)
    if outside.any():
        first = tuple(int(i) for i in np.argwhere(outside)[0])
        raise _fail(
            argument,
            "probabilities in [0, 1] (pass from_logits=True for logits)",
            f"{array[first].item()!r} at index {first}",
        )
    if array.size == 0:
        return
    atol = prob_sum_atol(array.shape[-1], input_dtype if input_dtype is not None else array.dtype)
    error = np.abs(array.sum(axis=-1) - 1.0)
    if (error > atol).any():
        first = tuple(int(i) for i in np.argwhere(error > atol)[0])
        raise _fail(
            argument,
            f"rows (last axis) summing to 1 within {atol:.1e} (pass from_logits=True for logits; "
            "mcu never renormalises)",
            f"a row summing to {array[first].sum().item()!r} at index {first}",
        )


def check_positive_int(value: Any, argument: str, *, minimum: int = 1) -> int:
    """:func:`mcu._checks.check_int` with ``minimum`` (default 1)."""
    return check_int(value, argument, minimum=minimum)  # type: ignore[return-value]


def check_level(level: Any, argument: str = "level") -> float:
    """Raise unless ``0 < level < 1``; return it as a float."""
    return check_number(level, argument, minimum=0, maximum=1, strict=True)  # type: ignore[return-value]


def log_base(base: Any) -> float:
    """``log(base)`` for converting nats, ``1.0`` for ``base=None`` (natural log)."""
    if base is None:
        return 1.0
    if isinstance(base, (bool, np.bool_)) or not isinstance(base, numbers.Real) or not (base > 0 and base != 1):
        raise _fail("base", "None (natural log) or a positive number other than 1, e.g. 2", repr(base))
    if not math.isfinite(base):
        raise _fail("base", "a finite number", repr(base))
    return math.log(base)


def validate_classification_samples(samples: Any, from_logits: Any, argument: str = "samples") -> np.ndarray:
    """Check a ``(T, N, C)`` stack of probabilities or logits; return it as float64.

    ``T >= 1`` and ``C >= 1`` are required; ``N = 0`` is allowed.
    """
    check_bool(from_logits, "from_logits")
    raw = as_numeric_array(samples, argument)
    array = raw.astype(np.float64, copy=False)
    check_ndim(array, argument, 3, "(T, N, C)")
    check_axis_nonempty(array, argument, 0, "samples, T")
    check_axis_nonempty(array, argument, 2, "classes, C")
    if from_logits:
        check_finite(array, argument)
    else:
        check_probabilities(array, argument, input_dtype=raw.dtype)
    return array


def validate_regression_samples(samples: Any, argument: str = "samples") -> np.ndarray:
    """Check a ``(T, N, ...)`` stack of real outputs with ``T >= 1``; return it as float64."""
    array = as_float_array(samples, argument)
    check_ndim(array, argument, 2, "(T, N, ...)", at_least=True)
    check_axis_nonempty(array, argument, 0, "samples, T")
    check_finite(array, argument)
    return array


def as_labels(labels: Any, n: int, n_classes: int | None = None, argument: str = "labels") -> np.ndarray:
    """Integer class labels of shape ``(n,)`` (bools are read as 0/1), each in ``[0, n_classes)``."""
    array = np.asarray(labels)
    if array.dtype.kind not in "biu":
        raise _fail(argument, "integer class labels", f"dtype {array.dtype}")
    check_ndim(array, argument, 1, "(N,)")
    if array.shape[0] != n:
        raise _fail(argument, f"{n} labels (one per row of the predictions)", f"{array.shape[0]}")
    array = array.astype(np.int64)
    if n_classes is not None and array.size and (array.min() < 0 or array.max() >= n_classes):
        bad = array[(array < 0) | (array >= n_classes)][0]
        raise _fail(argument, f"labels in [0, {n_classes})", f"label {int(bad)}")
    return array


def check_same_shape(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape != b.shape:
        raise _fail(b_name, f"the shape of {a_name} {a.shape}", f"shape {b.shape}")
