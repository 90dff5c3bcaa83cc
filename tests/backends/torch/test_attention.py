"""Attention dropout of the PyTorch twin from the call's stream (mcu.backends.torch.attention)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mcu
from tests.conftest import require_module

torch = require_module("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mcu.backends.torch import attention as torch_attention  # noqa: E402
from mcu.backends.torch.attention import attention  # noqa: E402


def _reference(q, k, v, attn_mask, p, is_causal, scale, mask):
    """The math of ``F.scaled_dot_product_attention`` in float64 with a given dropout mask."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.size(-1)) if scale is None else scale)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, -1)
    probs = torch.where(torch.isneginf(scores).all(-1, keepdim=True), 0.0, probs)
    return (probs * mask / (1 - p)) @ v


def _qkv(dtype=torch.float32, heads=3, rows=7, cols=9):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, heads, rows, 8, generator=g).to(dtype), torch.randn(2, heads, cols, 8, generator=g).to(dtype),
            torch.randn(2, heads, cols, 8, generator=g).to(dtype))


@pytest.mark.parametrize("case", ["plain", "scale", "causal", "bool mask", "float mask", "masked row"])
def test_attention_computes_sdpa_math_with_the_given_mask(case):
    q, k, v = _qkv()
    attn_mask, is_causal, scale = None, case == "causal", 0.3 if case == "scale" else None
    if case in ("bool mask", "masked row"):
        attn_mask = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(1)) > 0.3
        if case == "masked row":
            attn_mask[0, 0, 2] = False  # a query that sees nothing: zeros, as torch's math path
    elif case == "float mask":
        attn_mask = torch.randn(7, 9)
    drop = (torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(2)) > 0.25).to(torch.uint8)
    shapes = []
    got = attention(q, k, v, attn_mask, 0.25, is_causal, scale, lambda shape, keep: shapes.append((shape, keep)) or drop)
    assert shapes == [((2, 3, 7, 9), 0.75)]
    expected = _reference(q, k, v, attn_mask, 0.25, is_causal, scale, drop.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    if case == "masked row":
        assert torch.equal(got[0, :, 2], torch.zeros_like(got[0, :, 2]))
    # without dropping anything it is torch's own attention divided by the keep rate
    if case != "masked row":
        ones = torch.ones(2, 3, 7, 9, dtype=torch.uint8)
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        torch.testing.assert_close(attention(q, k, v, attn_mask, 0.25, is_causal, scale, lambda s, kp: ones) * 0.75,
                                   plain, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_keep_their_dtype_and_stay_within_bf16_rounding():
    q, k, v = _qkv(torch.bfloat16)
    drop = (torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(3)) > 0.1).to(torch.uint8)
    with torch.autocast("cpu", torch.bfloat16):  # autocast must not recast the float32 scores
        got = attention(q, k, v, None, 0.1, False, None, lambda shape, keep: drop)
    assert got.dtype == torch.bfloat16
    expected = _reference(q, k, v, None, 0.1, False, None, drop.double())
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


class OnlyAttention(nn.Module):
    """Uniform attention over 64 positions (zero queries) onto the identity: output [b, h, i, j] is the dropout
    mask of probability (b, h, i, j) times 1 / (64 keep)."""

    def __init__(self, p=0.3):
        super().__init__()
        self.p = p

    def forward(self, x):
        q = torch.zeros_like(x)
        v = torch.eye(x.size(-1)).expand_as(x)
        return F.scaled_dot_product_attention(q, x, v, dropout_p=self.p if self.training else 0.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_twin_attention_masks_come_from_the_stream_with_the_exact_rate(precision):
    model, x = OnlyAttention(0.3).eval(), torch.randn(4, 2, 64, 64)
    state = torch.get_rng_state()
    samples = mcu.sample(model, x, 12, strategy="loop", precision=precision)  # unseeded: no global generator
    assert torch.equal(torch.get_rng_state(), state)  # the masks came from the call's stream, not bernoulli_
    kept = samples != 0
    assert np.allclose(samples[kept], 1 / (64 * 0.7), rtol=1e-2 if precision == "bf16" else 1e-6)
    n = kept.size
    assert abs(kept.mean() - 0.7) < 5 * math.sqrt(0.21 / n)  # 5 standard errors of the keep rate
    assert model.training is False


def test_seeded_twin_attention_is_reproducible_and_independent_between_samples():
    model, x = OnlyAttention(0.5).eval(), torch.randn(2, 2, 64, 64)
    a, b = mcu.sample(model, x, 6, seed=3, strategy="loop"), mcu.sample(model, x, 6, seed=3, strategy="loop")
    np.testing.assert_array_equal(a, b)
    kept = (a != 0).reshape(6, -1).astype(float)
    corr = np.corrcoef(kept)[~np.eye(6, dtype=bool)]
    assert np.abs(corr).max() < 5 / math.sqrt(kept.shape[1])  # 5 standard errors of a correlation


def test_calls_it_cannot_compute_run_natively(monkeypatch):
    """Grouped-query attention (enable_gqa) is left to torch."""
    computed = []
    monkeypatch.setattr(torch_attention, "attention", lambda *a, **k: computed.append(1))

    class Gqa(nn.Module):
        def forward(self, x):
            kv = x[:, :1]
            return F.scaled_dot_product_attention(x, kv, kv, dropout_p=0.3 if self.training else 0.0, enable_gqa=True)

    out = mcu.sample(Gqa().eval(), torch.randn(3, 2, 16, 8), 4, strategy="loop")
    assert computed == [] and out.shape == (4, 3, 2, 16, 8)



def test_a_causal_call_with_an_explicit_mask_is_left_to_torch():
    """torch refuses attn_mask with is_causal=True; the twin's attention leaves such a call to torch (which
    raises) instead of computing it."""
    q, mask = torch.randn(1, 2, 4, 8), torch.ones(4, 4, dtype=torch.bool)
    assert torch_attention._arguments((q, q, q), {"attn_mask": mask, "dropout_p": 0.3, "is_causal": True}) is None
    assert torch_attention._arguments((q, q, q), {"dropout_p": 0.3, "is_causal": True}) is not None
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.3, is_causal=True)
