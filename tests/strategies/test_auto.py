"""The auto strategy: its choice is stable, explained, reproducible, within the memory budget; how it probes."""

from __future__ import annotations

import os

import numpy as np
import pytest

import mcu

from tests.conftest import require_module

torch = require_module("torch")

from tests import _models  # noqa: E402


def test_auto_is_stable_explained_and_reproducible():
    model = _models.zoo("torch").mlp()
    x = np.random.default_rng(1).standard_normal((8, 784)).astype(np.float32)
    first, info1 = mcu.sample(model, x, 40, seed=3, return_info=True)  # runs the probe
    second, info2 = mcu.sample(model, x, 40, seed=3, return_info=True)  # cached choice
    np.testing.assert_array_equal(first, second)
    assert (info1.strategy, info1.details) == (info2.strategy, info2.details)
    assert "probe" in info1.strategy_reason


def test_auto_probe_leaves_the_global_rng_alone():
    model = _models.zoo("torch").mlp()
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    _, info = mcu.sample(model, np.ones((3, 784), np.float32), 20, seed=1, return_info=True)
    assert "probe" in info.strategy_reason  # the first call on this model probed
    assert torch.equal(torch.rand(2), expected)


def test_max_memory_limits_copies_per_pass():
    model = _models.zoo("torch").mlp()
    x = np.ones((64, 784), np.float32)
    _, info = mcu.sample(model, x, 50, max_memory=200_000, return_info=True)
    # one copy of the suffix activations is 64 * 512 * 4 * 2 bytes ~ 262 kB: above the budget -> one copy
    assert info.details["copies_per_pass"] == 1


def test_the_default_budget_is_the_weights_plus_one_pass():
    """Big weights, tiny activations (one example): the copies may take about what the model holds, not just
    the 4 MB floor."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Dropout(0.5), torch.nn.Linear(2048, 2))
    _, info = mcu.sample(model, np.ones((1, 2048), np.float32), 20, return_info=True)
    weights = (2048 * 2048 + 2048 + 2048 * 2 + 2) * 4
    assert f"memory budget {weights / 2**20:.0f} MB" in info.strategy_reason
    assert weights / 2**20 > 15  # well above the floor


@pytest.mark.parametrize("free, expected_mb", [(None, 4), (20 << 20, 10), (1 << 40, 16)])
def test_the_weights_share_of_the_budget_stops_at_half_the_free_memory(monkeypatch, free, expected_mb):
    """A model that fills most of its device must not get a budget as large as itself; unknown free memory
    (an accelerator the backend cannot query) leaves the weights out."""
    from mcu.backends import get_backend

    monkeypatch.setattr(type(get_backend("torch")), "free_bytes", lambda self, model: free)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Dropout(0.5), torch.nn.Linear(2048, 2))
    _, info = mcu.sample(model, np.ones((1, 2048), np.float32), 20, return_info=True)
    assert f"memory budget {expected_mb} MB" in info.strategy_reason


class _Untraceable(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot split it, so its dropout has no per-sample streams."""

    def __init__(self, inputs: int = 64, width: int = 256) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.ReLU(), torch.nn.Dropout(0.5))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(h if h.sum() > 0 else -h)


def test_a_seeded_call_without_timing_stays_within_the_memory_budget():
    torch.manual_seed(0)
    model = _Untraceable()
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    first, info = mcu.sample(model, x, 40, seed=3, max_memory=40_000, return_info=True)
    assert "without timing" in info.strategy_reason and "memory budget" in info.strategy_reason
    assert info.details["copies_per_pass"] == 1  # one copy's activations (16 x 256 floats, twice) exceed 40 kB
    np.testing.assert_array_equal(first, mcu.sample(model, x, 40, seed=3, max_memory=40_000))
    _, roomy = mcu.sample(model, x, 40, seed=3, return_info=True)
    assert roomy.details["copies_per_pass"] > 1


def test_free_memory_does_not_change_a_seeded_call_without_per_sample_streams(monkeypatch):
    """There the copies per pass decide the samples: the budget comes from shapes and weights alone."""
    from mcu.backends import get_backend
    from mcu.strategies import auto

    torch.manual_seed(0)
    model = _Untraceable(2048, 2048)  # 16 MB of weights: above the 4 MB floor
    x = np.random.default_rng(0).standard_normal((16, 2048)).astype(np.float32)
    results = []
    for free in (1 << 40, 0, None):
        monkeypatch.setattr(type(get_backend("torch")), "free_bytes", lambda self, model, free=free: free)
        auto._cache.clear()  # measure the budget again
        results.append(mcu.sample(model, x, 40, seed=3, return_info=True))
    assert len({r[1].details["copies_per_pass"] for r in results}) == 1
    for samples, _ in results[1:]:
        np.testing.assert_array_equal(samples, results[0][0])


@pytest.mark.parametrize("strategy", ["vectorized", "prefix", "parallel"])
def test_explicit_strategies_stay_within_the_memory_budget(strategy):
    model = _models.zoo("torch").mlp()
    x = np.ones((64, 784), np.float32)
    _, info = mcu.sample(model, x, 50, strategy=strategy, max_memory=200_000, return_info=True)
    assert info.details["copies_per_pass"] == 1 and "memory budget" in info.strategy_reason
    _, info = mcu.sample(model, x, 50, strategy=strategy, max_memory=50 << 20, return_info=True)
    assert info.details["copies_per_pass"] > 1  # a raised budget allows more
    _, info = mcu.sample(model, x, 3, strategy=strategy, max_memory=50 << 20, return_info=True)
    assert "capped" not in info.strategy_reason  # all samples fit
    workers = os.cpu_count() or 1  # parallel's default: the budget shared by one block per worker
    assert info.details["copies_per_pass"] == (max(1, 3 // workers) if strategy == "parallel" else 3)
    _, info = mcu.sample(model, x, 50, strategy=strategy, max_memory=200_000, chunk_size=640, return_info=True)
    assert info.details["copies_per_pass"] == 10  # an explicit chunk_size is the caller's choice


def test_auto_can_choose_the_split_without_fused_pairs(monkeypatch):
    """The tables only pay with enough copies per pass, so auto also times the unfused variant of the split;
    when that is faster it runs it (and says so), with the same samples up to rounding."""
    from mcu.strategies import auto

    model = _models.zoo("torch").cnn()
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    timed_fused = []

    def fake_time(strategy, plan, copies):  # the unfused variant "wins"; record which variants were timed
        fused = bool(getattr(plan.split, "fused", ()))
        timed_fused.append(fused)
        return 1.0 if fused or strategy.name != "prefix" else 0.5

    monkeypatch.setattr(auto, "_time_per_sample", fake_time)
    samples, info = mcu.sample(model, x, 20, seed=4, return_info=True)
    assert True in timed_fused and False in timed_fused
    assert info.strategy == "prefix" and "not fused" in info.strategy_reason, info.strategy_reason
    fused = mcu.sample(model, x, 20, strategy="prefix", seed=4)
    np.testing.assert_allclose(samples, fused, rtol=1e-5, atol=1e-5)


def test_auto_times_the_largest_blocks_first_and_stops_two_sizes_past_the_best(monkeypatch):
    """The biggest blocks run first (before other sizes' allocator caches pile up) and a family stops after
    two sizes more than 1.2x slower than its best: here 100 copies per pass is best, so 50 and 25 end the scan.
    The second scan skips what is far behind, the loop included."""
    from mcu.strategies import auto

    model = _models.zoo("torch").mlp()
    x = np.random.default_rng(0).standard_normal((4, 784)).astype(np.float32)
    timed = []

    def fake_time(strategy, plan, copies):
        timed.append((strategy.name, copies))
        return 1.0 / copies if strategy.name != "loop" else 1.0  # bigger blocks: faster per sample

    monkeypatch.setattr(auto, "_time_per_sample", fake_time)
    monkeypatch.setattr(auto, "PARALLEL_MIN_BLOCK_SECONDS", float("inf"))  # single-thread families only
    _, info = mcu.sample(model, x, 100, max_memory=1 << 30, return_info=True)
    start = timed.index(("prefix", 100))
    first_scan = [c for name, c in timed[start : timed.index(("prefix", 100), start + 1)] if name == "prefix"]
    assert first_scan == [100, 50, 25], timed
    # the loop: once, for the tiny-pass check, which counts as the first scan's; far behind, not timed again
    assert timed.count(("loop", 1)) == 1, timed
    assert info.strategy == "prefix" and info.details["copies_per_pass"] == 100


@pytest.mark.parametrize("ratio, parallel_runs", [(1.5, 2), (2.5, 1)])
def test_the_second_scan_skips_worker_threads_far_behind(monkeypatch, ratio, parallel_runs):
    """Worker threads get a second look like every other configuration: only within RESCAN_FACTOR of the best."""
    from mcu.strategies import auto

    model = _models.zoo("torch").mlp()
    x = np.random.default_rng(0).standard_normal((4, 784)).astype(np.float32)
    runs = []

    def fake_time(strategy, plan, copies):
        runs.append(strategy.name)
        return {"loop": 1.0, "prefix": 0.01, "vectorized": 0.5}.get(strategy.name, ratio * 0.01)

    monkeypatch.setattr(auto, "_time_per_sample", fake_time)
    monkeypatch.setattr(auto, "PARALLEL_MIN_BLOCK_SECONDS", 0.0)
    _, info = mcu.sample(model, x, 40, workers=2, return_info=True)
    assert info.strategy == "prefix", info.strategy_reason
    assert runs.count("parallel") == parallel_runs, runs
