"""Blocks of samples spread over worker threads, each block with its own random stream.

On a CPU, small matrix products run faster as two single-threaded workers than as one two-threaded op, so
the framework's intra-op threads are set to one while the workers run (and restored afterwards). Results do
not depend on the number of workers: block ``i`` always uses the ``i``-th seed derived from the session seed,
and blocks are returned in order.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.prefix import DEFAULT_ROWS, run_block
from mcu.strategies.vectorized import blocks

__all__ = ["ParallelStrategy"]


class ParallelStrategy:
    name = "parallel"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        if plan.split is None:
            raise RuntimeError("the parallel strategy needs plan.split (prepared by mcu.strategies.auto.prepare)")
        copies = plan.copies_per_pass(DEFAULT_ROWS)
        sizes = blocks(n_samples, copies)
        seeds = plan.block_seeds(len(sizes))
        frontier = [plan.backend.repeat(f, sizes[0]) for f in plan.split.prefix(plan.x)]
        workers = min(plan.workers or os.cpu_count() or 1, len(sizes))
        with plan.backend.worker_threads(workers), ThreadPoolExecutor(workers, thread_name_prefix="mcu") as pool:
            futures = [pool.submit(_worker, plan, frontier, size, seed) for size, seed in zip(sizes, seeds)]
            try:
                for future in futures:
                    yield future.result()
            finally:  # on an error (or an abandoned generator) do not start the blocks still queued
                for future in futures:
                    future.cancel()


def _worker(plan: Plan, frontier: list, copies: int, seed: int) -> np.ndarray:
    with plan.backend.worker_context(plan.model, plan.precision):  # grad mode and autocast are per thread
        return run_block(plan, frontier, copies, seed)
