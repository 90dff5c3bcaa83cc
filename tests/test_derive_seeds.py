"""``mcu._seeds``: the one seed formula behind predict's batches, query's chunks, the loop's rounds and Ray."""

from __future__ import annotations

import numpy as np
import pytest

from mcu._seeds import derive_seed, derive_seeds


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**32 - 1, 2**40 + 3])
def test_derive_seeds_are_the_spawned_children(seed):
    spawned = [int(s.generate_state(1, np.uint32)[0]) for s in np.random.SeedSequence(seed).spawn(12)]
    assert derive_seeds(seed, 12) == spawned == [derive_seed(seed, key) for key in range(12)]


def test_values_are_pinned():
    # values of the formula before it moved to mcu/_seeds.py (seeded results of predict/query depend on them)
    assert derive_seeds(0, 3) == [3757552657, 673228719, 3241444873]
    assert derive_seeds(2**40 + 3, 2) == [2723874173, 2950439315]


def test_none_stays_unseeded():
    assert derive_seed(None, 4) is None
    assert derive_seeds(None, 3) == [None, None, None]


def test_old_names_are_the_same_function():
    from mcu.active import loop, querying
    from mcu.core.predict import batch_seeds

    assert batch_seeds is derive_seeds
    assert querying.derive_seed is derive_seed and loop.derive_seed is derive_seed
