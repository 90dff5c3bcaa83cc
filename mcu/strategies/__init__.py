"""Sampling strategies by name. Each is exact: it samples the distribution of T independent full passes."""

from __future__ import annotations

from mcu.strategies.base import Plan, Strategy
from mcu.strategies.loop import LoopStrategy
from mcu.strategies.vectorized import VectorizedStrategy

__all__ = ["STRATEGIES", "Plan", "Strategy", "get_strategy"]

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (LoopStrategy(), VectorizedStrategy())}


def get_strategy(name: str) -> Strategy:
    return STRATEGIES[name]
