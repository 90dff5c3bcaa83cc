"""Prefix caching: the deterministic part before the first dropout runs once; only the rest runs per sample.

Exact: the prefix is a deterministic function of the input, so computing it once and feeding k stacked copies
of its outputs to the stochastic suffix samples the same distribution as k full passes. The split comes from
the backend (``torch.fx`` / the Keras functional graph), validated against the model before use; the suffix
also uses the backend's cheap exact dropout masks where it has them, each block of samples with its own
random stream derived from the seed. The per-sample seeds and random streams are made for at most
:data:`SEED_GROUP` samples at a time, so their memory does not grow with ``n_samples``.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.vectorized import blocks as block_sizes

__all__ = ["PrefixStrategy", "plan_blocks", "run_block"]

#: Rows per suffix pass when neither the caller nor ``auto`` chose.
DEFAULT_ROWS = 512
#: Samples whose random streams are made together (seeds, keys, masks shared by their blocks); a call of at
#: most this many samples is one group. Grouping changes no sample: each depends only on its own seed.
SEED_GROUP = 1 << 16


def run_block(plan: Plan, frontier: list[Any], sources: Any, tables: dict | None = None) -> np.ndarray:
    """One block: ``len(sources)`` samples from the frontier (sliced from a repeated buffer unless the split
    stacks the copies itself). ``sources``: the block's slice of the call's per-sample random sources
    (``backend.generators``). ``tables``: kept by the caller across the blocks of one frontier, for splits
    that precompute per-example tables (PyTorch's fused channel dropout + convolution)."""
    n, copies = plan.n_rows, len(sources)
    inputs = frontier if _repeats_itself(plan) else [f[: copies * n] for f in frontier]
    kwargs = {} if tables is None else {"tables": tables}
    out = plan.backend.to_numpy(plan.select(plan.split.suffix(inputs, sources, **kwargs)))
    return out.reshape((copies, n) + out.shape[1:])


def plan_blocks(plan: Plan, n_samples: int) -> tuple[list[Any], Iterator[Any], int]:
    """The frontier (repeated for splits that need it), the per-sample random sources of the call in blocks of
    at most ``copies`` samples (an iterator: sources are made per group of :data:`SEED_GROUP` samples, one
    object per group so that PyTorch's streams draw small masks once for all its blocks), and the number of
    blocks."""
    frontier = plan.split.prefix(plan.x)
    copies = plan.copies_per_pass(DEFAULT_ROWS, plan.split.row_block(frontier))  # examples in row blocks?
    sizes = block_sizes(n_samples, copies)
    if not _repeats_itself(plan):
        frontier = [plan.backend.repeat(f, sizes[0]) for f in frontier]
    return frontier, _block_sources(plan, sizes), len(sizes)


def _block_sources(plan: Plan, sizes: Sequence[int]) -> Iterator[Any]:
    per_group = max(1, SEED_GROUP // sizes[0])  # blocks per group
    for first in range(0, len(sizes), per_group):
        group = sizes[first : first + per_group]
        sources = plan.backend.generators(plan.model, plan.sample_seeds(sum(group)))
        starts = np.cumsum([0, *group]).tolist()
        # every view of the group before any block runs: a view starts where its root's stream is now
        yield from [sources[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _repeats_itself(plan: Plan) -> bool:
    return plan.split.repeats_frontier


class PrefixStrategy:
    name = "prefix"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        if plan.split is None:
            raise RuntimeError("the prefix strategy needs plan.split (prepared by mcu.strategies.auto.prepare)")
        frontier, blocks, _ = plan_blocks(plan, n_samples)
        tables = {} if plan.split.fused else None
        for sources in blocks:
            yield run_block(plan, frontier, sources, tables)
