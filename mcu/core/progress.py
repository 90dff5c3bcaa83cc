"""Progress bars for long work: tqdm when it is installed and wanted, otherwise a silent stand-in."""

from __future__ import annotations

from typing import Any


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


def progress_bar(enabled: bool, *, total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar (to stderr) when ``enabled`` and tqdm is installed; a no-op object otherwise."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the 'progress' extra
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, leave=False)
