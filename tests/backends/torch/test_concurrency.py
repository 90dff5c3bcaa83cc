"""Concurrent calls on one PyTorch model: sampling threads per strategy plus a thread of plain inference.

What a web server does: many threads call ``mcu.sample`` / ``mcu.predict`` on one shared model while other
requests run the model normally. Nothing may leak between them: every sample set has spread, seeded calls
return what they return alone, plain passes stay deterministic, and the model is identical afterwards.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mcu
from tests.conftest import require_backend

require_backend("torch")
import torch  # noqa: E402
from torch import nn  # noqa: E402

STRATEGIES = ("loop", "vectorized", "prefix", "parallel", "auto")
THREADS, CALLS, T = 4, 4, 16


class MCNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.dropout, self.fc2 = nn.Linear(784, 128), nn.Dropout(0.5), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


def _encoder():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.3, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Flatten(),
                         nn.Linear(16 * 5, 3))


MODELS = {
    "mlp": (MCNet, (3, 784)),
    "transformer": (_encoder, (3, 5, 16)),  # dropout inside attention and the encoder layer's fast path
}


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def _same(a, b) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _hammer(model, x, strategy, seeded: bool):
    """THREADS sampling threads (CALLS calls each) and one plain-inference thread, all on ``model``."""
    with torch.no_grad():
        expected_plain = model(torch.from_numpy(x))
    stop, problems = threading.Event(), []

    def plain():
        while not stop.is_set():
            with torch.no_grad():
                out = model(torch.from_numpy(x))
            if not torch.allclose(out, expected_plain, atol=1e-6):
                problems.append("a plain pass was stochastic")

    def sampler(i):
        results = []
        for call in range(CALLS):
            seed = 100 * i + call if seeded else None
            results.append((seed, mcu.sample(model, x, T, strategy=strategy, seed=seed)))
        return results

    watcher = threading.Thread(target=plain)
    watcher.start()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            results = [r for f in [pool.submit(sampler, i) for i in range(THREADS)] for r in f.result()]
    finally:
        stop.set()
        watcher.join()
    return results, problems


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_concurrent_seeded_calls_return_what_they_return_alone(name, strategy):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = _state(model)
    results, problems = _hammer(model, x, strategy, seeded=True)
    assert not problems
    assert _same(before, _state(model))
    for seed, samples in results:
        assert samples.std(0).mean() > 0
        np.testing.assert_array_equal(samples, mcu.sample(model, x, T, strategy=strategy, seed=seed))


@pytest.mark.parametrize("strategy", ("loop", "vectorized", "prefix", "auto"))
def test_concurrent_unseeded_calls_sample_the_right_distribution(strategy):
    make, shape = MODELS["transformer"]
    torch.manual_seed(0)
    model = make().eval()
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    before = _state(model)
    results, problems = _hammer(model, x, strategy, seeded=False)
    assert not problems and _same(before, _state(model))
    pooled = np.concatenate([s for _, s in results])  # THREADS * CALLS * T samples
    alone = mcu.sample(model, x, len(pooled), strategy="loop", seed=5)
    ratio = pooled.std(0).mean() / alone.std(0).mean()
    assert 0.85 < ratio < 1.15  # 256 samples each: the standard error of the ratio is ~5%
    assert np.abs(pooled.mean(0) - alone.mean(0)).max() < 5 * alone.std(0).max() * np.sqrt(2 / len(pooled))


def test_concurrent_predict_calls_agree_with_a_serial_call():
    torch.manual_seed(0)
    model = MCNet().eval()
    x = np.random.default_rng(2).standard_normal((20, 784)).astype(np.float32)
    expected = mcu.predict(model, x, n_samples=30, seed=3).mean
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: mcu.predict(model, x, n_samples=30, seed=3).mean, range(8)))
    for mean in got:
        # the same masks; auto may time a different block size in each thread, which only changes the order of
        # floating-point sums (a seeded auto compares configurations with identical masks)
        np.testing.assert_allclose(mean, expected, rtol=1e-6, atol=1e-7)
