"""Prefix caching: the deterministic part before the first dropout runs once; only the rest runs per sample.

Exact: the prefix is a deterministic function of the input, so computing it once and feeding k stacked copies
of its outputs to the stochastic suffix samples the same distribution as k full passes. The split comes from
the backend (``torch.fx`` / the Keras functional graph), validated against the model before use; the suffix
also uses the backend's cheap exact dropout masks where it has them, each block of samples with its own
random stream derived from the seed.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.vectorized import blocks

__all__ = ["PrefixStrategy", "run_block"]

#: Rows per suffix pass when neither the caller nor ``auto`` chose.
DEFAULT_ROWS = 512


def run_block(plan: Plan, frontier: list[Any], copies: int, seed: int) -> np.ndarray:
    """One block: ``copies`` samples from the stacked frontier (sliced from a repeated buffer)."""
    n = plan.n_rows
    inputs = [f[: copies * n] for f in frontier]
    out = plan.backend.to_numpy(plan.split.suffix(inputs, plan.backend.generator(plan.model, seed)))
    return out.reshape((copies, n) + out.shape[1:])


class PrefixStrategy:
    name = "prefix"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        if plan.split is None:
            raise RuntimeError("the prefix strategy needs plan.split (prepared by mcu.strategies.auto.prepare)")
        copies = plan.copies_per_pass(DEFAULT_ROWS)
        sizes = blocks(n_samples, copies)
        frontier = [plan.backend.repeat(f, sizes[0]) for f in plan.split.prefix(plan.x)]
        for size, seed in zip(sizes, plan.block_seeds(len(sizes))):
            yield run_block(plan, frontier, size, seed)
