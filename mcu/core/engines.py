"""The engines a call can run on, by name: ``engine=`` of :func:`mcu.predict` and :func:`mcu.active.query`.

An engine other than ``"local"`` is a package implementing the same functions (``predict``, ``query``) with the
same arguments plus its own options. The core names it here by module path and imports it on the call that
asks for it, so the core and the applications never import an engine: the engines sit above them and may use
them freely (see ``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from mcu._checks import check_choice

__all__ = ["ENGINES", "engine_function"]

#: engine name -> the package implementing it (``None``: this process)
ENGINES: dict[str, str | None] = {"local": None, "ray": "mcu.distributed"}


def engine_function(engine: Any, function: str) -> Callable[..., Any] | None:
    """``engine``'s implementation of ``function``, or ``None`` for ``"local"`` (run it in this process).

    Raises:
        InputError: ``engine`` is not a name in :data:`ENGINES`.
        BackendNotInstalledError: the engine's dependencies are missing (raised by the engine package).
    """
    check_choice(engine, "engine", tuple(ENGINES))
    package = ENGINES[engine]
    if package is None:
        return None
    return getattr(importlib.import_module(package), function)
