"""Which backend runs a call, and why.

Resolution order (first match wins):

1. the ``backend=`` argument of the call;
2. :func:`use_backend` (innermost ``with`` block) or :func:`set_backend`;
3. the ``MCU_BACKEND`` environment variable;
4. ``backend = "..."`` under ``[tool.mcu]`` in ``pyproject.toml``, or at the top of ``mcu.toml``, in the
   working directory (``mcu.toml`` wins if both set it);
5. detection from the model's type (Keras is checked before torch: a Keras 3 layer on the torch backend is
   also a ``torch.nn.Module``).

Nothing is written anywhere and nothing is read at import time: every call resolves afresh.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mcu.errors import BackendError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["BACKEND_ALIASES", "Choice", "canonical_backend", "configured_backend", "set_backend", "use_backend"]

ENV_VAR = "MCU_BACKEND"

#: Every accepted spelling, mapped to the canonical backend name.
BACKEND_ALIASES = {
    "torch": "torch",
    "pytorch": "torch",
    "tensorflow": "tensorflow",
    "tf": "tensorflow",
    "keras": "tensorflow",
}

_global_choice: str | None = None
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("mcu_backend", default=None)


@dataclass(frozen=True)
class Choice:
    """A resolved backend name and the human-readable reason it was chosen."""

    name: str
    reason: str


def canonical_backend(name: object, *, argument: str = "backend") -> str:
    """Map a backend name or alias to its canonical name, or raise naming the valid choices."""
    if not isinstance(name, str) or name.strip().lower() not in BACKEND_ALIASES:
        valid = ", ".join(repr(k) for k in BACKEND_ALIASES)
        raise BackendError(f"{argument}: unknown backend {name!r}; expected one of {valid}.")
    return BACKEND_ALIASES[name.strip().lower()]


def set_backend(name: str | None) -> None:
    """Select the backend for every later call in this process (``None`` clears the choice).

    Example:
        >>> import mcu
        >>> mcu.set_backend("pytorch")
        >>> mcu.config.configured_backend().name
        'torch'
        >>> mcu.set_backend(None)
    """
    global _global_choice
    _global_choice = None if name is None else canonical_backend(name, argument="set_backend(name)")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Select the backend inside a ``with`` block (thread- and task-local); yields the canonical name."""
    token = _context_choice.set(canonical_backend(name, argument="use_backend(name)"))
    try:
        yield _context_choice.get()  # type: ignore[misc]
    finally:
        _context_choice.reset(token)


_parsed: dict[Path, tuple[tuple[int, int], dict]] = {}


def _read_toml(path: Path) -> dict:
    """The parsed file, re-read only when its modification time or size changed (this runs on every call)."""
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _parsed.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix the file or remove it.") from exc
    _parsed[path] = (stamp, data)
    return data


def _mcu_table(data: dict, path: Path) -> dict:
    """The ``[tool.mcu]`` table of a parsed file (empty if absent); ``InputError`` if a part is not a table."""
    table: object = data
    for depth, key in enumerate(("tool", "mcu")):
        table = table.get(key, {})  # type: ignore[union-attr]
        if not isinstance(table, dict):
            name = "[tool]" if depth == 0 else "[tool.mcu]"
            raise InputError(f"{path}: expected {name} to be a table (e.g. [tool.mcu] with backend = \"torch\"), "
                             f"got {key} = {table!r}.")
    return table  # type: ignore[return-value]


def _file_choice(cwd: Path) -> Choice | None:
    mcu_toml = cwd / "mcu.toml"
    if mcu_toml.is_file():
        data = _read_toml(mcu_toml)
        value = data.get("backend", _mcu_table(data, mcu_toml).get("backend"))
        if value is not None:
            return Choice(canonical_backend(value, argument=f"backend in {mcu_toml}"), f"backend in {mcu_toml}")
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        value = _mcu_table(_read_toml(pyproject), pyproject).get("backend")
        if value is not None:
            where = f"[tool.mcu] backend in {pyproject}"
            return Choice(canonical_backend(value, argument=where), where)
    return None


def configured_backend(argument: str | None = None) -> Choice | None:
    """The backend chosen by configuration (steps 1-4 of the order above), or ``None`` to detect it."""
    if argument is not None:
        return Choice(canonical_backend(argument), "backend= argument")
    if _context_choice.get() is not None:
        return Choice(_context_choice.get(), "mcu.use_backend() block")  # type: ignore[arg-type]
    if _global_choice is not None:
        return Choice(_global_choice, "mcu.set_backend()")
    env = os.environ.get(ENV_VAR)
    if env:
        return Choice(canonical_backend(env, argument=f"{ENV_VAR} environment variable"), f"{ENV_VAR}={env}")
    return _file_choice(Path.cwd())
