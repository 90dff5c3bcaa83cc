"""``mcu.backend_info``: installed frameworks, the selected backend, and why."""

from __future__ import annotations

import platform
from typing import Any

from mcu.backends import detect, installed_frameworks, keras_backend, missing
from mcu.config import configured_backend
from mcu.errors import MCUError

__all__ = ["backend_info", "format_info"]


def backend_info(model: Any = None) -> dict[str, Any]:
    """Report installed frameworks (versions read without importing them) and the backend that would run.

    Args:
        model: optional; when given, detection from its type is part of the answer.

    Returns:
        ``{"python": ..., "frameworks": {"torch": "2.13.0" | None, "tensorflow": ...},
        "selected": name | None, "reason": str}``, ``"keras_backend"`` and ``"keras_backend_reason"`` when Keras
        is installed (:func:`keras_backend`), and ``"error": message`` when the configuration is invalid
        (every call would then raise that error; the report says so instead of raising).
    """
    frameworks = installed_frameworks()
    keras_on = keras_backend()
    extra = {} if keras_on is None else {"keras_backend": keras_on[0], "keras_backend_reason": keras_on[1]}
    try:
        choice = configured_backend()
    except MCUError as exc:
        return {"python": platform.python_version(), "frameworks": frameworks, "selected": None,
                "reason": "invalid configuration: every call without backend= fails until it is fixed",
                "error": str(exc), **extra}
    if choice is not None:
        selected, reason = choice.name, choice.reason
    elif model is not None and detect(model) is not None:
        selected, reason = detect(model), f"detected from the model type {type(model).__qualname__}"
    else:
        selected = None
        portable = keras_on is not None and keras_on[0] != "tensorflow"
        installed = ", ".join(name + (f" (Keras on {keras_on[0]})" if name == "tensorflow" and portable else "")
                              for name, version in frameworks.items()
                              if missing(name) is None and (version or name == "tensorflow"))
        hint = 'none: pip install "mcu[torch]" or "mcu[tensorflow]"'
        reason = f"nothing configured: detected per call from the model type (installed: {installed or hint})"
    return {"python": platform.python_version(), "frameworks": frameworks, "selected": selected, "reason": reason,
            **extra}


def format_info(info: dict[str, Any]) -> str:
    lines = [f"python      {info['python']}"]
    for name, version in info["frameworks"].items():
        lines.append(f"{name:<11} {version or 'not installed'}")
    if info.get("keras_backend"):
        lines.append(f"{'keras on':<11} {info['keras_backend']} ({info['keras_backend_reason']})")
    lines.append(f"backend     {info['selected'] or '(per model)'}")
    lines.append(f"why         {info['reason']}")
    if info.get("error"):
        lines.append(f"error       {info['error']}")
    return "\n".join(lines)
