"""Every dropout site of real PyTorch architectures is on during sampling, and nothing else.

The oracle: on a model without batch statistics, MC dropout samples what ``model.train()`` + T passes samples.
Each case compares mcu's spread (the mean over outputs of the standard deviation over T = 200 samples) with
the literal recipe's, run on a deep copy of the model. With T = 200 the standard error of a standard deviation
is about 5%, and the ratio pools many outputs, so [0.8, 1.25] is a wide margin for equal distributions; a site
left off moves the ratio far outside it (the negative controls show it).
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import pytest

import mcu
from tests.conftest import require_backend, require_module

require_backend("torch")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

T = 200


def literal_spread(model: nn.Module, x: torch.Tensor, t: int = T, seed: int = 0) -> np.ndarray:
    """The literal recipe on a copy: model.train() and t passes."""
    twin = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = torch.stack([twin(x) for _ in range(t)]).numpy()
    return out.std(0)


def mcu_spread(model: nn.Module, x: torch.Tensor, strategy: str = "auto", seed: int = 1) -> np.ndarray:
    return mcu.sample(model, x, T, strategy=strategy, seed=seed).std(0)


def ratio(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.mean() / b.mean())


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = F.dropout(torch.relu(self.fc1(x)), 0.3, training=self.training)
        return self.fc2(h)


class Attention(nn.Module):
    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, dropout=dropout, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.mha(x, x, x, need_weights=False)
        return self.head(h.mean(1))


class Sdpa(nn.Module):
    """Attention dropout the way Hugging Face writes it: ``dropout_p = p if self.training else 0``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.p = nn.Linear(16, 48), nn.Linear(16, 2), 0.3

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.out(h.mean(1))


class Recurrent(nn.Module):
    def __init__(self, kind=nn.LSTM):
        super().__init__()
        self.rnn = kind(8, 16, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class DropPath(nn.Module):
    """timm's drop-path (stochastic depth): one Bernoulli draw per example, scaled."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.path = nn.Linear(16, 16), DropPath(0.3)

    def forward(self, x):
        return x + self.path(torch.relu(self.fc(x)))


class Nested(nn.Module):
    """Subclassed model holding a Sequential holding a subclassed block with functional dropout."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), FunctionalBlock(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


class FunctionalBlock(nn.Module):
    def forward(self, x):
        return F.dropout(torch.tanh(x), p=0.25, training=self.training)


def _transformer():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.3, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                         nn.Linear(16 * 5, 3))


def _decoder():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.3, batch_first=True)
            self.dec, self.head = nn.TransformerDecoder(layer, 1), nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.dec(x, x).mean(1))

    return Decoder()


class Logits(nn.Module):
    """A Hugging Face model called with token ids, returning its logits (structured outputs come later)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def _bert(attn_implementation: str, hidden: float = 0.0, attention: float = 0.3):
    transformers = require_module("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification._from_config(config, attn_implementation=attn_implementation)
    return Logits(model.eval())


def _gpt2():
    transformers = require_module("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.3, num_labels=2,
                                     pad_token_id=0)
    torch.manual_seed(0)
    return Logits(transformers.GPT2ForSequenceClassification(config).eval())


def _vit():
    transformers = require_module("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3)
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(config).eval()

    class Pixels(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            return self.vit(pixel_values=x).logits

    return Pixels()


def _ids(n: int = 3, length: int = 6) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(1, 50, size=(n, length)))


def _floats(*shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))


CASES = {
    "functional F.dropout": (lambda: FunctionalDropout(), lambda: _floats(3, 16)),
    "nn.MultiheadAttention": (lambda: Attention(), lambda: _floats(3, 5, 16)),
    "scaled_dot_product_attention": (lambda: Sdpa(), lambda: _floats(3, 5, 16)),
    "nn.LSTM(dropout=)": (lambda: Recurrent(nn.LSTM), lambda: _floats(3, 6, 8)),
    "nn.GRU(dropout=)": (lambda: Recurrent(nn.GRU), lambda: _floats(3, 6, 8)),
    "nn.TransformerEncoder": (_transformer, lambda: _floats(3, 5, 16)),
    "nn.TransformerDecoder": (_decoder, lambda: _floats(3, 5, 16)),
    "drop-path": (lambda: nn.Sequential(Residual(), Residual(), nn.Linear(16, 2)), lambda: _floats(3, 16)),
    "nested and subclassed": (lambda: Nested(), lambda: _floats(3, 16)),
    "BERT eager, attention dropout only": (lambda: _bert("eager"), _ids),
    "BERT sdpa, attention dropout only": (lambda: _bert("sdpa"), _ids),
    "BERT sdpa, all dropout": (lambda: _bert("sdpa", hidden=0.1), _ids),
    "GPT-2": (_gpt2, _ids),
    "ViT": (_vit, lambda: _floats(3, 1, 8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mcu_samples_the_spread_of_the_literal_recipe(name):
    make_model, make_x = CASES[name]
    model, x = make_model().eval(), make_x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    expected = literal_spread(model, x)
    assert expected.mean() > 0
    got = mcu_spread(model, x)
    assert 0.8 < ratio(got, expected) < 1.25, (name, ratio(got, expected))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("strategy", ["loop", "vectorized", "prefix"])
@pytest.mark.parametrize("name", ["nn.TransformerEncoder", "nn.MultiheadAttention", "functional F.dropout",
                                  "drop-path"])
def test_every_strategy_samples_the_literal_spread(name, strategy):
    make_model, make_x = CASES[name]
    model, x = make_model().eval(), make_x()
    got = mcu_spread(model, x, strategy=strategy)
    assert 0.8 < ratio(got, literal_spread(model, x)) < 1.25


def test_negative_control_a_site_left_off_is_detected():
    """The band has power: a sampler that leaves one site off (attention dropout, as mcu did before; here the
    literal recipe with that rate at 0) lands far outside it, and a model with only that site raises."""
    model, x = Attention(0.3).eval(), _floats(3, 5, 16)
    off = copy.deepcopy(model)
    off.mha.dropout = 0.0  # the site left off
    assert 0.8 < ratio(mcu_spread(model, x), literal_spread(model, x)) < 1.25
    assert not 0.8 < ratio(literal_spread(off, x, seed=1), literal_spread(model, x)) < 1.25
    with pytest.raises(mcu.NoDropoutError):
        mcu.sample(off, x, 5)
    bert, ids = _bert("sdpa"), _ids()
    assert ratio(mcu.sample(bert, ids, 50, strategy="loop", seed=0, mode="dropout").std(0),
                 literal_spread(bert, ids, 50)) > 0.8
    bert.model.config.attention_probs_dropout_prob = 0.0
    for layer in bert.model.bert.encoder.layer:  # what the attention reads: the module's own rate
        layer.attention.self.dropout.p = 0.0
        layer.attention.self.dropout_prob = 0.0
    with pytest.raises(mcu.NoDropoutError):
        mcu.sample(bert, ids, 5)


def test_batchnorm_keeps_its_statistics_while_functional_dropout_runs():
    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            h = F.dropout(torch.relu(self.bn(self.conv(x))), 0.3, training=self.training)
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    model = ConvBN().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    model.eval()
    stats = [b.clone() for b in model.bn.buffers()]
    x = _floats(5, 1, 8, 8)
    samples = mcu.sample(model, x, 400, seed=0, strategy="loop")
    assert all(torch.equal(a, b) for a, b in zip(stats, model.bn.buffers()))
    # running statistics used: E[dropout(h)] = h, so the MC mean is the eval-mode output (a linear head)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(samples.mean(0) - expected).max() < 4 * samples.std(0).max() / np.sqrt(400) + 1e-4


def test_rate_zero_dropout_is_an_identity_and_not_dropout():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    x = _floats(3, 4)
    _, info = mcu.sample(model, x, 10, strategy="prefix", seed=0, return_info=True)
    assert "3 graph nodes run once" in info.strategy_reason  # the p=0 dropout did not cut the prefix
    with pytest.raises(mcu.NoDropoutError, match="rate 0"):
        mcu.sample(nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.0)), x, 3)


def test_a_site_mcu_cannot_switch_on_is_named():
    """A dropout gated by another module's flag (here a child that is not an ancestor of the call) is on in
    ``model.train()`` but stays off in the twin: sampling says so, naming the module."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.d, self.gate = nn.Linear(4, 4), nn.Dropout(0.5), nn.Identity()

        def forward(self, x):
            return F.dropout(self.d(self.fc(x)), 0.5, training=self.gate.training)

    with pytest.warns(mcu.errors.DropoutSiteWarning, match="Gated"):
        samples = mcu.sample(Gated().eval(), _floats(2, 4), 5, seed=0)
    assert samples.std(0).mean() > 0  # the other site is on


def test_weight_dropout_is_not_stacked():
    """Dropout on a weight matrix draws one mask for the whole batch: stacked copies would share it, so only
    separate passes are exact."""
    class DropConnect(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return F.linear(x, F.dropout(self.fc.weight, 0.5, training=self.training), self.fc.bias)

    model, x = DropConnect().eval(), _floats(4, 6)
    samples, info = mcu.sample(model, x, 50, seed=0, return_info=True)
    assert info.strategy == "loop" and "shared by the whole batch" in info.strategy_reason
    _, info = mcu.sample(model, x, 5, strategy="vectorized", seed=0, return_info=True)
    assert info.strategy == "loop"


def test_the_twin_follows_changes_to_the_model():
    model, x = FunctionalDropout().eval(), _floats(3, 16)
    a = mcu.sample(model, x, 4, seed=0)
    with torch.no_grad():
        model.fc2.weight.mul_(0.0)
        model.fc2.bias.fill_(1.0)  # in place: shared tensors, seen at once
    np.testing.assert_array_equal(mcu.sample(model, x, 4, seed=0), np.ones_like(a))
    model.fc2 = nn.Linear(32, 2)  # a replaced module: the twin is rebuilt
    assert mcu.sample(model, x, 4, seed=0).shape == (4, 3, 2)


def test_no_silent_zero_warns_when_samples_are_identical():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.d = nn.Linear(4, 2), nn.Dropout(0.5)

        def forward(self, x):
            return self.fc(x) + 0.0 * self.d(x).sum()

    with pytest.warns(mcu.errors.DropoutSiteWarning, match="identical"):
        mcu.sample(Dead().eval(), _floats(2, 4), 5, strategy="loop")


def test_training_mode_uses_batch_statistics_without_touching_the_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = mcu.sample(model, _floats(6, 4), 5, mode="training", seed=0)
    assert samples.std(0).mean() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_threads_do_not_see_each_others_switches():
    """The mechanism mutates nothing: while threads sample, the user's own eval passes stay deterministic."""
    model, x = _transformer().eval(), _floats(3, 5, 16)
    with torch.no_grad():
        expected = model(x)
    stop, bad = threading.Event(), []

    def plain():
        while not stop.is_set():
            with torch.no_grad():
                if not torch.allclose(model(x), expected, atol=1e-6):
                    bad.append("plain")

    thread = threading.Thread(target=plain)
    thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(5):
                assert mcu.sample(model, x, 20, strategy="vectorized").std(0).mean() > 0
    finally:
        stop.set()
        thread.join()
    assert not bad and not model.training
