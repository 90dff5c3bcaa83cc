"""Blocks of samples spread over worker threads, each block with its own random stream.

On a CPU, small matrix products run faster as two single-threaded workers than as one two-threaded op, so
the framework's intra-op threads are divided between the workers while they run (and restored afterwards).
Results do not depend on the number of workers or the block size: sample ``j`` always uses the ``j``-th
seed derived from the session seed, and blocks are returned in order.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from mcu.strategies.base import Plan
from mcu.strategies.prefix import plan_blocks, run_block

__all__ = ["ParallelStrategy"]


class ParallelStrategy:
    name = "parallel"

    def draw(self, plan: Plan, n_samples: int) -> Iterator[np.ndarray]:
        if plan.split is None:
            raise RuntimeError("the parallel strategy needs plan.split (prepared by mcu.strategies.auto.prepare)")
        frontier, blocks, count = plan_blocks(plan, n_samples)
        workers = min(plan.workers or os.cpu_count() or 1, count)
        # The calling thread is one of the workers: one thread (and one allocator arena, which keeps what its
        # blocks allocated) fewer than a pool of `workers` threads. At most `workers` blocks are in flight.
        with plan.backend.worker_threads(workers), ThreadPoolExecutor(max(1, workers - 1),
                                                                      thread_name_prefix="mcu") as pool:
            while group := list(itertools.islice(blocks, workers)):
                futures: list[Future] = [pool.submit(_worker, plan, frontier, sources) for sources in group[1:]]
                try:
                    yield run_block(plan, frontier, group[0])
                    for future in futures:
                        yield future.result()
                finally:  # on an error (or an abandoned generator) do not start queued blocks
                    for future in futures:
                        future.cancel()


def _worker(plan: Plan, frontier: list, sources: Any) -> np.ndarray:
    with plan.backend.worker_context(plan.model, plan.precision):  # grad mode and autocast are per thread
        return run_block(plan, frontier, sources)
