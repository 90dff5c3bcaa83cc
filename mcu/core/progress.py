"""Progress bars for long work: tqdm when it is installed and wanted, otherwise a silent stand-in.

Whether a bar is shown (:func:`show_progress`): the function's ``progress`` argument when it is ``True`` or
``False``; else the ``MCU_PROGRESS`` environment variable (``1``/``true`` or ``0``/``false``, any case);
else only when standard error is a terminal or a Jupyter kernel, so logs of batch jobs and pipes stay
free of bar redraws.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from mcu.errors import InputError

__all__ = ["ENV_VAR", "env_progress", "progress_bar", "show_progress"]

ENV_VAR = "MCU_PROGRESS"
_ON, _OFF = ("1", "true"), ("0", "false")


class _Silent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def env_progress() -> bool | None:
    """The ``MCU_PROGRESS`` setting: ``True``/``False``, or ``None`` when the variable is not set."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    text = value.strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise InputError(f"{ENV_VAR} environment variable: expected 1, 0, true or false, got {value!r}.")


def _interactive() -> bool:
    """Standard error is a terminal, or this runs in a Jupyter kernel (whose stderr is not a terminal)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def show_progress(progress: bool | None, argument: str = "progress") -> bool:
    """Resolve a ``progress`` argument: ``True``/``False`` win, ``None`` defers to ``MCU_PROGRESS``, then to
    whether standard error is interactive.

    Raises:
        InputError: ``progress`` is not ``True``, ``False`` or ``None``, or ``MCU_PROGRESS`` is not one of
            ``1``, ``0``, ``true``, ``false``.
    """
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"{argument}: expected True, False or None (the default), got {progress!r}.")
    if progress is not None:
        return progress
    env = env_progress()
    return _interactive() if env is None else env


def progress_bar(enabled: bool | None, *, total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar (to stderr) when :func:`show_progress` says so and tqdm is installed; a no-op object
    otherwise."""
    if not show_progress(enabled):
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the 'progress' extra
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=False)
