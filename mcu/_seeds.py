"""Seeds and exact Bernoulli planning shared by every engine and both backends (numpy only).

- :func:`derive_seed` / :func:`derive_seeds`: the one formula for "item ``key`` of a seeded call";
- :func:`sample_keys`: the 64-bit key of each Monte Carlo sample's random stream (both backends' fast masks);
- :func:`keep_plan`: how a Bernoulli(keep) draw is made exactly from a few uniform random bits.

**Seeds.** Every engine derives the seed of a batch (:func:`mcu.predict`, :mod:`mcu.distributed`), a pool chunk
(:func:`mcu.active.query`) or a round (:class:`mcu.active.ActiveLearningLoop`) from the call's ``seed`` and the
item's index alone, so any process computes the same seed for the same item without coordination, and the
items' random streams are independent (``numpy.random.SeedSequence`` spawn keys).

Example:
    >>> derive_seeds(7, 3)[2] == derive_seed(7, 2)
    True
    >>> derive_seed(None, 5) is None
    True
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

__all__ = ["GAMMA", "derive_seed", "derive_seeds", "keep_plan", "sample_keys"]

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (odd; 2**64 / golden ratio)


def derive_seed(seed: int | None, key: int) -> int | None:
    """The seed of item ``key`` derived from ``seed`` (``None`` stays unseeded).

    Equals ``SeedSequence(seed).spawn(n)[key].generate_state(1)[0]`` for any ``n > key``: the first 32-bit word
    of the child sequence with spawn key ``(key,)``.
    """
    if seed is None:
        return None
    return int(np.random.SeedSequence(seed, spawn_key=(key,)).generate_state(1, np.uint32)[0])


def derive_seeds(seed: int | None, n: int) -> list[int | None]:
    """The seeds of items ``0 .. n-1``: ``[derive_seed(seed, i) for i in range(n)]``."""
    return [derive_seed(seed, key) for key in range(n)]


def sample_keys(seeds: Sequence[int]) -> np.ndarray:
    """``(k,)`` uint64: the first SplitMix64 output for each seed, ``splitmix64(seed + GAMMA)`` (a bijection of
    64-bit words, so distinct seeds give distinct keys; all 64 bits used). Seeds are taken modulo 2**64."""
    z = np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64) + np.uint64(GAMMA)
    with np.errstate(over="ignore"):  # wrap-around arithmetic is the point
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def keep_plan(keep: float | Fraction, digits: int, widths: Sequence[int]) -> tuple[int, int, int]:
    """How to draw Bernoulli(``keep``), ``0 < keep < 1``, from uniform bit fields: ``(bits, threshold, rest)``.

    ``keep`` is taken to ``digits`` binary digits, ``q = floor(keep * 2**digits)`` (exact for every float64
    ``keep >= 2**(53 - digits)``). A draw keeps an element when a uniform ``bits``-bit field is below
    ``threshold``. When ``keep`` is a multiple of ``2**-bits`` for one of ``widths`` (the smallest such is
    taken), that is exact and ``rest == 0``: 0.5 -> 1 bit, 0.75 -> 2 bits. Otherwise ``bits`` is the last of
    ``widths`` and a field *equal* to ``threshold`` (a tie) is settled by comparing more uniform bits with
    ``rest``, keep's next ``digits - bits`` binary digits.

    Example:
        >>> keep_plan(0.75, 80, (1, 2, 4, 8, 16))
        (2, 3, 0)
        >>> bits, threshold, rest = keep_plan(0.9, 104, (1, 2, 4, 8))
        >>> bits, threshold, rest > 0
        (8, 230, True)
    """
    q = math.floor(Fraction(keep) * (1 << digits))
    for bits in widths:
        if q % (1 << (digits - bits)) == 0:
            return bits, q >> (digits - bits), 0
    bits = widths[-1]
    return bits, q >> (digits - bits), q & ((1 << (digits - bits)) - 1)
