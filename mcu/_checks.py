"""Argument checks shared by every public entry point.

Every check raises :class:`mcu.errors.InputError` (a ``ValueError``) with one message format,
``"<argument>: expected <what>, got <what was given>."``, so the caller sees which argument to fix. Booleans
are never accepted as numbers, NaN is never accepted where a number is expected, and nothing is coerced
silently: a check returns the value as a plain ``int``/``float`` only after it passed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from mcu.errors import InputError

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "fail"]


def fail(argument: str, expected: str, got: str) -> InputError:
    """The error for ``argument``: ``"<argument>: expected <expected>, got <got>."``."""
    return InputError(f"{argument}: expected {expected}, got {got}.")


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_int(value: Any, argument: str, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` if it is an integer in ``[minimum, maximum]`` (bounds optional; bools refused).

    Example:
        >>> check_int(3, "n_samples", minimum=1)
        3
    """
    if value is None and allow_none:
        return None
    ok = not _is_bool(value) and isinstance(value, numbers.Integral)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        raise fail(argument, _range("an integer", minimum, maximum, False, allow_none), _shown(value))
    return int(value)


def check_number(value: Any, argument: str, *, minimum: float | None = None, maximum: float | None = None,
                 strict: bool = False, allow_none: bool = False, finite: bool = True) -> float | None:
    """``value`` as a ``float`` if it is a real number in range (NaN always refused; infinities too unless
    ``finite=False``). ``strict``: both bounds exclusive.

    Example:
        >>> check_number(0.5, "alpha", minimum=0, maximum=1, strict=True)
        0.5
    """
    if value is None and allow_none:
        return None
    ok = not _is_bool(value) and isinstance(value, numbers.Real)
    if ok:
        number = float(value)
        ok = not math.isnan(number) and (math.isfinite(number) or not finite)
        if ok and minimum is not None:
            ok = number > minimum if strict else number >= minimum
        if ok and maximum is not None:
            ok = number < maximum if strict else number <= maximum
    if not ok:
        if minimum == 0 and strict and maximum is None:
            expected = "a positive number" + (" or None" if allow_none else "")
        else:
            expected = _range("a number", minimum, maximum, strict, allow_none)
        raise fail(argument, expected, _shown(value))
    return number


def check_choice(value: Any, argument: str, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices`` (a string choice matches only a string)."""
    try:
        ok = bool(value in choices) and (isinstance(value, str) or not any(isinstance(c, str) for c in choices))
    except (TypeError, ValueError):  # unhashable, or an array whose == is elementwise: not a choice
        ok = False
    if not ok:
        raise fail(argument, f"one of {', '.join(map(repr, choices))}", _shown(value))
    return value


def check_bool(value: Any, argument: str) -> bool:
    """Return ``value`` as a ``bool`` if it is ``True`` or ``False`` (numpy bools included)."""
    if not _is_bool(value):
        raise fail(argument, "True or False", _shown(value))
    return bool(value)


def _range(kind: str, minimum: Any, maximum: Any, strict: bool, allow_none: bool) -> str:
    low, high = (">", "<") if strict else (">=", "<=")
    if minimum is not None and maximum is not None:
        text = f"{kind} {'strictly ' if strict else ''}between {minimum} and {maximum}"
        if not strict:
            text = f"{kind} in [{minimum}, {maximum}]"
    elif minimum is not None:
        text = f"{kind} {low} {minimum}"
    elif maximum is not None:
        text = f"{kind} {high} {maximum}"
    else:
        text = kind
    return text + (" or None" if allow_none else "")


def _shown(value: Any) -> str:
    """``repr`` of a value, shortened (a large array or string must not flood the message)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"a {type(value).__qualname__}"
    if len(text) > 80:
        text = text[:77] + "..."
    return text if isinstance(value, (numbers.Number, str, type(None))) else f"{text} ({type(value).__qualname__})"
