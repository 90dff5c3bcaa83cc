"""Seed derivation: the one formula for "item ``key`` of a seeded call".

Every engine derives the seed of a batch (:func:`mcu.predict`, :mod:`mcu.distributed`), a pool chunk
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

import numpy as np

__all__ = ["derive_seed", "derive_seeds"]


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
