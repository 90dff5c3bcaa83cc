"""Hide TensorFlow from this process, as if it were not installed (``MCU_BLOCK_TENSORFLOW=1``, see conftest.py).

:func:`install` wraps the path finders of ``sys.meta_path`` so that they do not see ``tensorflow`` (nor
``tensorflow.*``) or the TensorFlow distributions: ``import tensorflow`` raises ``ModuleNotFoundError``,
``importlib.util.find_spec("tensorflow")`` returns None and ``importlib.metadata.version("tensorflow")`` raises
``PackageNotFoundError``, exactly as without the package (a ``sys.modules["tensorflow"] = None`` entry would
not do: Keras and torch ask ``"tensorflow" in sys.modules`` / ``find_spec``). It must run before anything
imports TensorFlow.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["install"]

_PACKAGE = "tensorflow"


def _hidden(name: str | None) -> bool:
    return name is not None and (name == _PACKAGE or name.startswith(tuple(_PACKAGE + c for c in ".-_")))


class _Blind:
    """A meta path finder that answers as ``finder`` does, except that TensorFlow does not exist."""

    def __init__(self, finder: Any) -> None:
        self._finder = finder

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return None if _hidden(name) else self._finder.find_spec(name, path, target)

    def find_distributions(self, *args: Any, **kwargs: Any) -> Any:
        found = getattr(self._finder, "find_distributions", None)
        if found is None:
            return iter(())
        return (d for d in found(*args, **kwargs) if not _hidden((d.metadata["Name"] or "").lower()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._finder, name)


def install() -> None:
    """Hide TensorFlow from now on; raises RuntimeError if it was imported already."""
    loaded = sorted(name for name in sys.modules if _hidden(name))
    if loaded:
        raise RuntimeError(f"cannot hide TensorFlow: already imported ({loaded[:3]})")
    if not any(isinstance(finder, _Blind) for finder in sys.meta_path):
        sys.meta_path[:] = [_Blind(finder) for finder in sys.meta_path]
