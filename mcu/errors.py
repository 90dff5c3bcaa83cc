"""Exceptions raised by mcu. Every message says what was given, what was expected, and how to fix it."""

from __future__ import annotations

__all__ = [
    "MCUError",
    "NoDropoutError",
    "BackendError",
    "BackendNotInstalledError",
    "BackendMismatchError",
    "InputError",
    "DropoutSiteWarning",
]


class MCUError(Exception):
    """Base class of every error mcu raises on purpose."""


class NoDropoutError(MCUError, ValueError):
    """The model has no dropout layer, so MC dropout would return T identical predictions."""


class BackendError(MCUError, ValueError):
    """An unknown backend name, or a model no backend understands."""


class BackendNotInstalledError(MCUError, ImportError):
    """The framework a backend needs is not installed."""


class BackendMismatchError(BackendError):
    """The configured backend does not fit the model that was passed."""


class InputError(MCUError, ValueError):
    """An argument has the wrong type, shape or value."""


class DropoutSiteWarning(UserWarning):
    """Some dropout sites of the model stay off during sampling (mcu could not switch them on without
    changing the model), so the samples underestimate the spread."""
