"""What every sampling strategy implements. Strategies talk to a framework only through the backend protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

__all__ = ["Plan", "Strategy"]


@dataclass
class Plan:
    """Everything a strategy needs for one session: backend, model, converted input, limits and choices."""

    backend: Any
    model: Any
    x: Any  # framework tensor, batch axis first
    chunk_size: int | None = None  # max rows per forward pass (None: chosen by the strategy / auto)
    max_memory: int | None = None  # bytes the copies may add (None: about one full pass's activations)
    precision: str = "fp32"
    seeds: np.random.SeedSequence = field(default_factory=np.random.SeedSequence)
    split: Any = None  # a validated prefix/suffix split (prefix and parallel strategies)
    copies: int | None = None  # copies of the batch per pass, when auto tuned it
    workers: int | None = None  # threads for the parallel strategy
    seeded: bool = False  # the caller gave a seed: auto must not let timing change the result

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])

    def copies_per_pass(self, default_rows: int) -> int:
        """Copies of the batch per forward pass: tuned value, else ``chunk_size`` (or ``default_rows``) // N."""
        if self.copies is not None:
            return self.copies
        return max(1, (self.chunk_size or max(default_rows, self.n_rows)) // self.n_rows)

    def sample_seeds(self, n_samples: int) -> list[int]:
        """One independent seed per sample, derived from the session seed in sample order (stateful: each
        call continues the stream). Strategies with per-sample generators therefore give the same samples
        however they group them into passes or spread them over workers."""
        return [int(s.generate_state(1, np.uint64)[0] >> 1) for s in self.seeds.spawn(n_samples)]


class Strategy(Protocol):
    name: str

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        """Yield numpy chunks of shape ``(t_i, N, *out)`` with ``sum(t_i) == n_samples``, in sample order."""
