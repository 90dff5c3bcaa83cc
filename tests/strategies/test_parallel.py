"""The parallel strategy: deterministic whatever the workers and grouping; threads restored; its fallback."""

from __future__ import annotations

import numpy as np
import pytest

import mcu

from tests.conftest import require_module

torch = require_module("torch")
from torch import nn  # noqa: E402

from tests import _models  # noqa: E402


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_is_deterministic_whatever_the_number_of_workers(workers):
    model = _models.zoo("torch").mlp()
    x = np.random.default_rng(0).standard_normal((4, 784)).astype(np.float32)
    reference = mcu.sample(model, x, 23, strategy="prefix", chunk_size=12, seed=7)
    out = mcu.sample(model, x, 23, strategy="parallel", chunk_size=12, seed=7, workers=workers)
    np.testing.assert_array_equal(out, reference)
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("chunk_size", [4, 12, 40, 400])
def test_samples_do_not_depend_on_how_they_are_grouped_into_passes(chunk_size):
    """Per-sample generators: prefix with any copies per pass, and seeded auto, return the same samples."""
    model = _models.zoo("torch").cnn()
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    reference = mcu.sample(model, x, 9, strategy="prefix", chunk_size=4, seed=7)
    np.testing.assert_allclose(mcu.sample(model, x, 9, strategy="prefix", chunk_size=chunk_size, seed=7), reference,
                               rtol=1e-5, atol=1e-6)  # batched convolutions may round differently
    auto, info = mcu.sample(model, x, 9, chunk_size=chunk_size, seed=7, return_info=True)
    assert info.strategy in ("prefix", "parallel")
    np.testing.assert_allclose(auto, reference, rtol=1e-5, atol=1e-6)


def test_parallel_restores_the_thread_count():
    before = torch.get_num_threads()
    mcu.sample(_models.zoo("torch").mlp(), np.ones((2, 784), np.float32), 8, strategy="parallel", workers=2)
    assert torch.get_num_threads() == before


def test_parallel_falls_back_when_dropout_uses_the_global_rng():
    model = nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(0.2), nn.Linear(4, 2))
    _, info = mcu.sample(model, np.ones((2, 4), np.float32), 4, strategy="parallel", return_info=True)
    assert info.strategy == "prefix" and "shared random state" in info.strategy_reason
    assert mcu.sample(model, np.ones((2, 4), np.float32), 4, strategy="prefix", seed=0).shape == (4, 2, 2)
