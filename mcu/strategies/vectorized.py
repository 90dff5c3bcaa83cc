"""Repeat the batch along the batch axis and run several samples in one forward pass.

Exact: each row of the repeated batch meets its own independent dropout mask, exactly as in separate passes.
Memory grows with the number of copies, so passes hold at most ``chunk_size`` rows.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.loop import LoopStrategy

__all__ = ["DEFAULT_ROWS", "VectorizedStrategy", "blocks"]

#: Rows per pass when neither the caller nor ``auto`` chose (``auto`` tunes copies per model and shape).
DEFAULT_ROWS = 1024


def blocks(n_samples: int, copies: int) -> list[int]:
    """Sizes of the fewest consecutive blocks of at most ``copies`` samples covering ``n_samples``, as equal as
    possible, largest first (100 at 62: 50 + 50, not 62 + 38; 10 at 4: 4 + 3 + 3), so that the passes of a
    call allocate buffers of (nearly) one size."""
    count = -(-n_samples // copies)
    base, extra = divmod(n_samples, count)
    return [base + 1] * extra + [base] * (count - extra)


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
