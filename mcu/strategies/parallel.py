"""Blocks of samples spread over worker threads, each block with its own random stream.

On a CPU, small matrix products run faster as two single-threaded workers than as one two-threaded op, so
the framework's intra-op threads are divided between the workers while they run (and restored afterwards).
Results do not depend on the number of workers or the block size: sample ``j`` always uses the ``j``-th
seed derived from the session seed, and blocks are returned in order.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Iterator

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.prefix import plan_blocks, run_block

__all__ = ["ParallelStrategy"]


class ParallelStrategy:
    name = "parallel"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        if plan.split is None:
            raise RuntimeError("the parallel strategy needs plan.split (prepared by mcu.strategies.auto.prepare)")
        frontier, blocks = plan_blocks(plan, n_samples)
        workers = min(plan.workers or os.cpu_count() or 1, len(blocks))
        with plan.backend.worker_threads(workers), ThreadPoolExecutor(workers, thread_name_prefix="mcu") as pool:
            # at most `workers` blocks in flight: memory stays ~workers blocks, whatever n_samples is
            jobs = iter(blocks)
            pending: deque[Future] = deque(pool.submit(_worker, plan, frontier, seeds) for seeds in islice(jobs, workers))
            try:
                while pending:
                    block = pending.popleft().result()
                    pending.extend(pool.submit(_worker, plan, frontier, seeds) for seeds in islice(jobs, 1))
                    yield block
            finally:  # on an error (or an abandoned generator) do not start the queued blocks
                for future in pending:
                    future.cancel()


def _worker(plan: Plan, frontier: list, seeds: list[int]) -> np.ndarray:
    with plan.backend.worker_context(plan.model, plan.precision):  # grad mode and autocast are per thread
        return run_block(plan, frontier, seeds)
