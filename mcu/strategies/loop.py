"""The reference strategy: one full forward pass per sample."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mcu.strategies.base import Plan

__all__ = ["LoopStrategy"]


def _rows(plan: Plan) -> list[slice]:
    """Row slices of at most ``chunk_size`` rows covering the batch (one slice when no limit is set)."""
    size = plan.chunk_size or plan.n_rows
    return [slice(start, start + size) for start in range(0, plan.n_rows, size)]


class LoopStrategy:
    """``T`` independent forward passes over the batch (split into ``chunk_size`` rows if it is larger)."""

    name = "loop"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        backend, model = plan.backend, plan.model
        slices = _rows(plan)
        for _ in range(n_samples):
            parts = [backend.to_numpy(plan.select(backend.forward(model, plan.x[s]))) for s in slices]
            yield (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))[None]
