"""What every sampling strategy implements. Strategies talk to a framework only through the backend protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

__all__ = ["Plan", "SeedStream", "Strategy"]


class SeedStream:
    """Per-sample seeds of a session: sample ``i`` (counted across calls) gets ``mix((base + i) mod 2**32)``.

    ``base`` comes from ``np.random.SeedSequence(seed)`` (fresh entropy without a seed). The seeds are 32-bit
    words (the backends derive each sample's random stream from its seed); ``mix`` is a bijection of 32-bit
    words (a multiply-xorshift hash), so the first 2**32 samples of a session get *distinct* seeds (random
    32-bit seeds would collide: about ``T**2 / 2**33`` per call) and neighbouring samples get unrelated-looking
    seeds. Vectorized: a few microseconds per call.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._base = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
        self._next = 0

    def take(self, n: int) -> list[int]:
        x = (np.arange(n, dtype=np.uint64) + np.uint64(self._base + self._next)) & np.uint64(0xFFFFFFFF)
        self._next += n
        x = x.astype(np.uint32)
        with np.errstate(over="ignore"):  # wrap-around multiplication is the point
            x ^= x >> np.uint32(16)
            x *= np.uint32(0x7FEB352D)
            x ^= x >> np.uint32(15)
            x *= np.uint32(0x846CA68B)
            x ^= x >> np.uint32(16)
        return x.tolist()


@dataclass
class Plan:
    """Everything a strategy needs for one session: backend, model, converted input, limits and choices."""

    backend: Any
    model: Any
    x: Any  # framework tensor, batch axis first
    chunk_size: int | None = None  # max rows per forward pass (None: chosen by the strategy / auto)
    max_memory: int | None = None  # bytes the copies may add (None: weights + one pass's activations)
    precision: str = "fp32"
    seeds: SeedStream = field(default_factory=SeedStream)
    split: Any = None  # a validated prefix/suffix split (prefix and parallel strategies)
    copies: int | None = None  # copies of the batch per pass, when auto tuned it
    workers: int | None = None  # threads for the parallel strategy
    seeded: bool = False  # the caller gave a seed: auto must not let timing change the result
    output: Any = None  # what to sample from a structured output (mcu.sample(output=...))

    def select(self, out: Any) -> Any:
        """The sampled tensor of one pass's raw output (``output=``)."""
        return self.backend.select_output(out, self.output)

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])

    def copies_per_pass(self, default_rows: int, rows_per_copy: int | None = None) -> int:
        """Copies of the batch per forward pass: the tuned value, else ``chunk_size // N``, else ``default_rows``
        over the rows one copy puts in a pass (``rows_per_copy``: N, or fewer when a split runs the examples
        in row blocks)."""
        if self.copies is not None:
            return self.copies
        if self.chunk_size is not None:
            return max(1, self.chunk_size // self.n_rows)
        rows = rows_per_copy or self.n_rows
        return max(1, max(default_rows, rows) // rows)

    def sample_seeds(self, n_samples: int) -> list[int]:
        """One seed per sample, derived from the session seed in sample order (stateful: each call continues
        the stream; see :class:`SeedStream`). Strategies with per-sample random streams therefore give the same
        samples however they group them into passes or spread them over workers."""
        return self.seeds.take(n_samples)


class Strategy(Protocol):
    name: str

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        """Yield numpy chunks of shape ``(t_i, N, *out)`` with ``sum(t_i) == n_samples``, in sample order."""
