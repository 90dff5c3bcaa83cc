"""Sampling strategies by name. Each is exact: it samples the distribution of T independent full passes.

- ``loop``: one full pass per sample (the reference).
- ``vectorized``: k copies of the batch per pass.
- ``prefix``: the deterministic part before the first dropout once, the rest on k copies, cheap masks.
- ``parallel``: blocks of the prefix strategy on worker threads, deterministic whatever the worker count.
- ``auto`` (see :mod:`mcu.strategies.auto`): the fastest of these for the model and input, by a cached probe.
"""

from __future__ import annotations

from mcu.strategies.base import Plan, Strategy
from mcu.strategies.loop import LoopStrategy
from mcu.strategies.parallel import ParallelStrategy
from mcu.strategies.prefix import PrefixStrategy
from mcu.strategies.vectorized import VectorizedStrategy

__all__ = ["STRATEGIES", "Plan", "Strategy"]

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (LoopStrategy(), VectorizedStrategy(), PrefixStrategy(), ParallelStrategy())
}
