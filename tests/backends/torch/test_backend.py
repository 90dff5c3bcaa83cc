"""PyTorch-only guarantees: global RNG untouched, no autograd, dtype conversion, device handling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mcu

from tests.conftest import require_module

torch = require_module("torch")
from tests import _models  # noqa: E402


def test_seeded_call_leaves_the_global_rng_alone():
    zoo = _models.zoo("torch")
    model, x = zoo.mlp(), np.ones((2, 784), np.float32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mcu.sample(model, x, 3, seed=9)
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_tied_weights_count_once_in_the_weight_bytes():
    from mcu.backends import get_backend

    embed = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = embed.weight  # tied, as language models do
    model = torch.nn.Sequential(embed, torch.nn.Dropout(0.1), head)
    assert get_backend("torch").weight_bytes(model) == 1000 * 64 * 4


def test_no_gradients_are_recorded():
    zoo = _models.zoo("torch")
    model = zoo.mlp()
    seen = []
    model.fc2.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled() or o.requires_grad))
    mcu.sample(model, np.ones((2, 784), np.float32), 3)
    assert seen and not any(seen)
    assert all(p.grad is None for p in model.parameters())


def test_float64_numpy_input_is_converted_to_the_model_dtype():
    zoo = _models.zoo("torch")
    model = zoo.mlp()
    x = np.random.default_rng(0).standard_normal((2, 784))
    np.testing.assert_array_equal(mcu.sample(model, x, 2, seed=1), mcu.sample(model, x.astype(np.float32), 2, seed=1))


def test_every_torch_dropout_kind_is_found():
    from mcu.backends import get_backend

    nn = torch.nn
    kinds = [nn.Dropout(0.1), nn.Dropout1d(0.1), nn.Dropout2d(0.1), nn.Dropout3d(0.1), nn.AlphaDropout(0.1),
             nn.FeatureAlphaDropout(0.1)]
    model = nn.Sequential(nn.Linear(2, 2), *kinds)
    assert get_backend("torch").dropout_layers(model) == kinds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_gpu_keeps_its_device():  # pragma: no cover - no GPU on CI
    model = _models.zoo("torch").mlp().cuda()
    out = mcu.sample(model, np.ones((2, 784), np.float32), 3)
    assert isinstance(out, np.ndarray) and next(model.parameters()).is_cuda


def test_bf16_precision_runs_and_returns_float32():
    model = _models.zoo("torch").mlp()
    out = mcu.sample(model, np.ones((2, 784), np.float32), 3, precision="bf16", seed=0)
    assert out.dtype == np.float32 and out.shape == (3, 2, 10)


def test_a_torchscript_model_gets_its_dropout_switched_on(tmp_path):
    nn = torch.nn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still in use
        torch.jit.script(nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2))).save(tmp_path / "m.pt")
    model = torch.jit.load(tmp_path / "m.pt")  # as the Ray engine loads a TorchScript file
    model.eval()
    x = np.ones((3, 4), np.float32)
    samples, info = mcu.sample(model, x, 30, seed=0, return_info=True)
    assert samples.std(0).min() > 0  # stochastic: dropout is on
    assert not model.training and not any(m.training for m in model.modules())  # restored
    eval_out = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(samples.mean(0) - eval_out).max() < 1.0  # same model, MC mean near the deterministic pass
