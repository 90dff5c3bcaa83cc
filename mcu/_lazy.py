"""Lazy package attributes: a name is imported from its module on first use, with a clear error naming the
``pip install "mcu[extra]"`` that provides a missing optional dependency."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from mcu.errors import BackendNotInstalledError

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, names: dict[str, str], extras: dict[str, str],
                    namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: attribute ``name`` comes from module ``names[name]`` (cached in
    ``namespace``, the package's globals); an ``ImportError`` of a top-level module in ``extras`` becomes a
    :class:`~mcu.errors.BackendNotInstalledError` naming the extra to install."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = importlib.import_module(names[name])
        except ImportError as exc:
            top = (exc.name or "").split(".")[0]
            if top in extras:
                raise BackendNotInstalledError(
                    f"{package}.{name} needs {top} (not installed): pip install \"mcu[{extras[top]}]\"."
                ) from exc
            raise
        value = namespace[name] = getattr(module, name)
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
