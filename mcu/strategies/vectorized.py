"""Repeat the batch along the batch axis and run several samples in one forward pass.

Exact: each row of the repeated batch meets its own independent dropout mask, exactly as in separate passes.
Memory grows with the number of copies, so passes hold at most ``chunk_size`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Iterator

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.loop import LoopStrategy

__all__ = ["DEFAULT_ROWS", "Blocks", "VectorizedStrategy", "blocks"]

#: Rows per pass when neither the caller nor ``auto`` chose (``auto`` tunes copies per model and shape).
DEFAULT_ROWS = 1024


class Blocks(Sequence):
    """Sizes of the fewest consecutive blocks of at most ``copies`` samples covering ``n_samples``, as equal as
    possible, largest first (100 at 62: 50 + 50, not 62 + 38; 10 at 4: 4 + 3 + 3), so that the passes of a
    call allocate buffers of (nearly) one size. Computed on access: memory O(1) whatever ``n_samples``."""

    def __init__(self, n_samples: int, copies: int) -> None:
        self.count = -(-n_samples // copies)
        self.base, self.extra = divmod(n_samples, self.count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.base + 1 if index < self.extra else self.base

    def __iter__(self) -> Iterator[int]:
        for i in range(self.count):
            yield self.base + 1 if i < self.extra else self.base

    def __repr__(self) -> str:
        return f"Blocks({self.count} blocks: {self.extra} of {self.base + 1}, {self.count - self.extra} of {self.base})"


def blocks(n_samples: int, copies: int) -> Blocks:
    """:class:`Blocks` of ``n_samples`` at most ``copies`` per block (``list(blocks(10, 4)) == [4, 3, 3]``)."""
    return Blocks(n_samples, copies)


class VectorizedStrategy:
    """``k`` copies of the batch per pass (``chunk_size // N``, or tuned); row-chunked passes if ``N`` is larger."""

    name = "vectorized"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        copies = plan.copies_per_pass(DEFAULT_ROWS)
        if copies <= 1:
            yield from LoopStrategy().draw(plan, n_samples)
            return
        backend, n = plan.backend, plan.n_rows
        sizes = blocks(n_samples, copies)
        repeated = backend.repeat(plan.x, sizes[0])
        for t in sizes:
            out = backend.to_numpy(plan.select(backend.forward(plan.model, repeated[: t * n])))
            yield out.reshape((t, n) + out.shape[1:])
