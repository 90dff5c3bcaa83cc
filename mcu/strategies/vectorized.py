"""Repeat the batch along the batch axis and run several samples in one forward pass.

Exact: each row of the repeated batch meets its own independent dropout mask, exactly as in separate passes.
Memory grows with the number of copies, so passes hold at most ``chunk_size`` rows.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.loop import LoopStrategy

__all__ = ["DEFAULT_ROWS", "VectorizedStrategy"]

#: Rows per pass when the caller gives no ``chunk_size`` (the ``auto`` strategy tunes this per model).
DEFAULT_ROWS = 1024


class VectorizedStrategy:
    """``k = chunk_size // N`` copies of the batch per pass; falls back to row-chunked passes if ``N`` is larger."""

    name = "vectorized"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        rows = plan.chunk_size or max(DEFAULT_ROWS, plan.n_rows)
        copies = rows // plan.n_rows
        if copies <= 1:
            yield from LoopStrategy().draw(plan, n_samples)
            return
        backend, n = plan.backend, plan.n_rows
        repeated = backend.repeat(plan.x, min(copies, n_samples))
        done = 0
        while done < n_samples:
            t = min(copies, n_samples - done)
            out = backend.to_numpy(backend.forward(plan.model, repeated[: t * n]))
            yield out.reshape((t, n) + out.shape[1:])
            done += t
