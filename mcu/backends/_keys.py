"""Per-sample stream keys shared by the backends' fast dropout masks (numpy only)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["GAMMA", "sample_keys"]

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (odd; 2**64 / golden ratio)


def sample_keys(seeds: Sequence[int]) -> np.ndarray:
    """``(k,)`` uint64: the first SplitMix64 output for each seed, ``splitmix64(seed + GAMMA)`` (a bijection of
    64-bit words, so distinct seeds give distinct keys; all 64 bits used). Seeds are taken modulo 2**64."""
    z = np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64) + np.uint64(GAMMA)
    with np.errstate(over="ignore"):  # wrap-around arithmetic is the point
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z
