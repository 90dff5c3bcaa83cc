"""Micro-batching: coalesce concurrent requests into one blocking call run in one worker thread.

The event loop never samples. A request's examples (an array, or named inputs sharing the batch axis; sizes
count examples) wait in a queue; the batching task takes the oldest
request, adds queued requests while the total stays within ``max_batch`` examples and until ``max_wait``
seconds have passed since the oldest arrived, then hands the group to ``run`` in the worker thread. While
that call runs, new requests queue up and form the next group, so under load the batches fill without
waiting. A request larger than ``max_batch`` runs alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from mcu.structured import rows

__all__ = ["MicroBatcher"]


@dataclass
class _Item:
    x: Any  # (n, ...) examples, or named inputs {name: (n, ...)}
    arrived: float
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Coalesces :meth:`submit` calls into ``run(list_of_arrays) -> list_of_results`` calls.

    Args:
        run: blocking; one result per array, in order. Called in ``executor`` (default: one thread).
        max_batch: most examples (rows) per call.
        max_wait: seconds the oldest request may wait for companions.
        executor: where ``run`` runs; must run one call at a time if the model needs it.
    """

    def __init__(self, run: Callable[[Sequence[np.ndarray]], list[Any]], *, max_batch: int, max_wait: float,
                 executor: concurrent.futures.Executor | None = None) -> None:
        self._run, self.max_batch, self.max_wait = run, int(max_batch), float(max_wait)
        self._own_executor = executor is None
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mcu-sampling")
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Item | None = None

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mcu-micro-batcher")

    async def stop(self) -> None:
        """Finish the queued requests, then stop (and shut down the executor this batcher created)."""
        if self._task is not None and self._queue is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        if self._own_executor:
            self.executor.shutdown(wait=True)

    async def submit(self, x: Any) -> Any:
        """Queue ``x`` (``(n, ...)``, or a dict of such arrays sharing ``n``) and wait for its result."""
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the micro-batcher is not running")
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.time(), loop.create_future())
        await self._queue.put(item)
        return await item.future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping or self._carry is not None:
            first = self._carry if self._carry is not None else await self._queue.get()
            self._carry = None
            if first is None:
                break
            group, size = [first], rows(first.x)
            deadline = first.arrived + self.max_wait
            while size < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                if item is None:
                    stopping = True
                    break
                if size + rows(item.x) > self.max_batch:
                    self._carry = item
                    break
                group.append(item)
                size += rows(item.x)
            await self._dispatch(loop, group)
        while not self._queue.empty():  # nothing arrives after stop(); answer anything left defensively
            item = self._queue.get_nowait()
            if item is not None:
                await self._dispatch(loop, [item])

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, group: list[_Item]) -> None:
        try:
            results = await loop.run_in_executor(self.executor, self._run, [item.x for item in group])
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error; the loop keeps serving
            for item in group:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, result in zip(group, results):
            if not item.future.done():  # a client that went away has cancelled its future
                item.future.set_result(result)
