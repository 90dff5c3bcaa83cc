"""The micro-batcher on its own: groups within max_batch examples, carry-over, errors, draining on stop."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from mcu.serve.batching import MicroBatcher


def rows(n: int, value: float) -> np.ndarray:
    return np.full((n, 2), value)


class Recorder:
    def __init__(self, fail_on: float | None = None) -> None:
        self.groups: list[list[int]] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, xs):
        self.threads.add(threading.current_thread().name)
        self.groups.append([len(x) for x in xs])
        if self.fail_on is not None and any(x[0, 0] == self.fail_on for x in xs):
            raise RuntimeError("boom")
        return [float(x[0, 0]) for x in xs]


def run_batcher(record: Recorder, submit_sizes: list[int], max_batch: int, max_wait: float = 0.05):
    async def main():
        batcher = MicroBatcher(record, max_batch=max_batch, max_wait=max_wait)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(n, i)) for i, n in enumerate(submit_sizes)),
                                       return_exceptions=True)
        await batcher.stop()
        return results

    return asyncio.run(main())


def test_requests_queued_together_share_calls_within_max_batch():
    record = Recorder()
    results = run_batcher(record, [3, 3, 3, 3, 3], max_batch=7)
    assert results == [0.0, 1.0, 2.0, 3.0, 4.0]  # each request gets its own answer
    assert record.groups == [[3, 3], [3, 3], [3]]  # the third request waits for the next call (carry-over)
    assert record.threads == {"mcu-sampling_0"}  # one worker thread, never the event loop


def test_a_request_larger_than_a_batch_runs_alone():
    record = Recorder()
    assert run_batcher(record, [2, 10, 1], max_batch=4) == [0.0, 1.0, 2.0]
    assert record.groups == [[2], [10], [1]]


def test_an_error_reaches_every_request_of_its_call_and_the_batcher_keeps_serving():
    record = Recorder(fail_on=1.0)
    results = run_batcher(record, [1, 1, 5, 1], max_batch=2)
    assert record.groups == [[1, 1], [5], [1]]
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert results[2:] == [2.0, 3.0]


def test_submit_after_stop_is_refused():
    async def main():
        batcher = MicroBatcher(Recorder(), max_batch=4, max_wait=0.0)
        batcher.start()
        await batcher.stop()
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(rows(1, 0))

    asyncio.run(main())
