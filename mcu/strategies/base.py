"""What every sampling strategy implements. Strategies talk to a framework only through the backend protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np

__all__ = ["Plan", "Strategy"]


@dataclass(frozen=True)
class Plan:
    """Everything a strategy needs for one call: the backend, the model, the converted input and limits."""

    backend: Any
    model: Any
    x: Any  # framework tensor, batch axis first
    chunk_size: int | None  # max rows per forward pass (None: the strategy decides)

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])


class Strategy(Protocol):
    name: str

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        """Yield numpy chunks of shape ``(t_i, N, *out)`` with ``sum(t_i) == n_samples``, in sample order."""
