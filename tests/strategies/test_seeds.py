"""Per-sample seeds: reproducible, continuing across calls, distinct within a session."""

from __future__ import annotations

import numpy as np

from mcu.strategies.base import SeedStream


def test_the_stream_continues_across_calls_and_is_reproducible():
    whole = SeedStream(3).take(50)
    stream = SeedStream(3)
    assert stream.take(20) + stream.take(30) == whole
    assert SeedStream(4).take(50) != whole


def test_seeds_are_distinct_32_bit_words():
    """torch keeps only 32 bits of a generator's seed: random 63-bit seeds would collide (birthday) after
    ~2**16 samples; a bijective mix of a counter never does within 2**32 samples."""
    seeds = np.array(SeedStream(0).take(1 << 20), dtype=np.int64)
    assert seeds.min() >= 0 and seeds.max() < 1 << 32
    assert len(np.unique(seeds)) == len(seeds)


def test_the_counter_wraps_around_without_repeating_early():
    stream = SeedStream(0)
    stream._next = (1 << 32) - 5  # near the end of the 32-bit counter
    assert len(set(stream.take(10))) == 10


def test_neighbouring_seeds_look_unrelated():
    seeds = np.array(SeedStream(1).take(100_000), dtype=np.float64)
    corr = np.corrcoef(seeds[:-1], seeds[1:])[0, 1]
    assert abs(corr) < 5 / np.sqrt(len(seeds))
    bits = (np.array(SeedStream(1).take(100_000), dtype=np.uint64)[:, None] >> np.arange(32, dtype=np.uint64)) & 1
    assert np.abs(bits.mean(0) - 0.5).max() < 5 * 0.5 / np.sqrt(100_000)  # every bit balanced
