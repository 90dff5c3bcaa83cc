"""Structured inputs (a dict or tuple of arrays sharing the batch axis) and outputs (``output=``)."""

from __future__ import annotations

import numpy as np
import pytest

import mcu
from mcu.structured import Batch, output_keys, select_output
from tests.conftest import require_backend, require_module


def _ids(n: int = 4, length: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1, 50, size=(n, length))
    mask = np.ones_like(ids)
    mask[:, length - 2:] = 0  # padding at the end
    return {"input_ids": ids, "attention_mask": mask}


def _hf(kind: str):
    require_backend("torch")
    transformers = require_module("transformers")
    import torch

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16, num_labels=3)
        return transformers.BertForSequenceClassification(config).eval()
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=3,
                                     pad_token_id=0)
    return transformers.GPT2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind, strategy", [("bert", "auto"), ("bert", "loop"), ("gpt2", "vectorized")])
def test_hugging_face_dict_inputs_and_logits(kind, strategy):
    import torch

    model, x = _hf(kind), _ids()
    samples, info = mcu.sample(model, x, 40, output="logits", strategy=strategy, seed=0, return_info=True)
    assert samples.shape == (40, 4, 3) and samples.std(0).mean() > 0
    # the literal recipe with the same named inputs: means agree within Monte Carlo error
    twin = __import__("copy").deepcopy(model).train()
    torch.manual_seed(1)
    with torch.no_grad():
        ref = torch.stack([twin(**{k: torch.from_numpy(v) for k, v in x.items()}).logits for _ in range(120)])
    ref = ref.numpy()
    se = np.sqrt(samples.var(0) / 40 + ref.var(0) / 120)
    assert np.all(np.abs(samples.mean(0) - ref.mean(0)) < 5 * se + 1e-6)
    assert 0.6 < samples.std(0).mean() / ref.std(0).mean() < 1.6  # T=40: a loose band on the spread


def test_the_mask_is_used():
    model, x = _hf("bert"), _ids()
    unmasked = dict(x, attention_mask=np.ones_like(x["attention_mask"]))
    a = mcu.sample(model, x, 3, output="logits", seed=0, strategy="loop")
    b = mcu.sample(model, unmasked, 3, output="logits", seed=0, strategy="loop")
    assert not np.allclose(a, b)


def test_structured_output_without_output_lists_the_keys():
    with pytest.raises(mcu.InputError, match=r"output=.*available: \['logits'\]"):
        mcu.sample(_hf("bert"), _ids(), 3)


def test_tuple_and_dict_outputs_and_tuple_inputs():
    require_backend("torch")
    import torch
    from torch import nn

    class TwoHeads(nn.Module):
        def __init__(self, as_dict: bool):
            super().__init__()
            self.fc, self.d, self.a, self.b, self.as_dict = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2), \
                nn.Linear(8, 1), as_dict

        def forward(self, x, scale):
            h = self.d(torch.relu(self.fc(x))) * scale
            return {"cls": self.a(h), "reg": self.b(h)} if self.as_dict else (self.a(h), self.b(h))

    x = (np.ones((3, 4), np.float32), np.full((3, 1), 2.0, np.float32))
    for as_dict, key in ((False, 1), (True, "reg")):
        model = TwoHeads(as_dict).eval()
        samples = mcu.sample(model, x, 20, output=key, seed=0)
        assert samples.shape == (20, 3, 1) and samples.std(0).min() > 0
        with pytest.raises(mcu.InputError, match="available"):
            mcu.sample(model, x, 2)
    with pytest.raises(mcu.InputError, match="not in the forward pass"):
        mcu.sample(TwoHeads(True).eval(), x, 2, output="nope")
    with pytest.raises(mcu.InputError, match="output: expected"):
        mcu.sample(TwoHeads(True).eval(), x, 2, output=1.5)


def test_inputs_must_share_the_batch_axis_and_be_arrays():
    model = _hf("bert")
    x = _ids()
    with pytest.raises(mcu.InputError, match="same batch axis"):
        mcu.sample(model, dict(x, attention_mask=x["attention_mask"][:2]), 2, output="logits")
    with pytest.raises(mcu.InputError, match=r"x\['input_ids'\]: expected a numpy array"):
        mcu.sample(model, {"input_ids": [[1, 2]]}, 2, output="logits")
    with pytest.raises(mcu.InputError, match="empty dict"):
        mcu.sample(model, {}, 2, output="logits")


def test_batch_slices_and_signature():
    batch = Batch(("a", "b"), (np.zeros((5, 2)), np.ones((5, 3), np.int64)))
    assert batch.shape[0] == 5 and batch[1:3].shape[0] == 2
    assert batch.shape != Batch(("a", "b"), (np.zeros((5, 2)), np.ones((5, 4), np.int64))).shape
    assert output_keys((1, 2)) == [0, 1] and output_keys({"x": 1}) == ["x"]
    assert select_output({"x": 3}, "x", lambda t: isinstance(t, int)) == 3


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_predict_and_query_take_dict_inputs_and_output(kind):
    model, x = _hf(kind), _ids(n=10, seed=3)
    pred = mcu.predict(model, x, n_samples=8, output="logits", batch_size=4, seed=0)
    assert pred.mean.shape == (10, 3) and np.allclose(pred.mean.sum(1), 1.0)
    assert np.all(pred.mutual_information >= -1e-9) and pred.mutual_information.max() > 0
    again = mcu.predict(model, {k: v[4:8] for k, v in x.items()}, n_samples=8, output="logits", seed=0)
    assert again.mean.shape == (4, 3)
    indices, scores = mcu.active.query(model, x, 3, n_samples=8, batch_size=4, output="logits", seed=0,
                                       progress=False)
    assert indices.shape == (3,) and np.all(np.diff(scores) <= 0)
    subset, _ = mcu.active.query(model, x, 2, n_samples=8, output="logits", seed=0, progress=False,
                                 subset=[1, 5, 7])
    assert set(subset.tolist()) <= {1, 5, 7}


def _keras_two_inputs(output_kind: str):
    require_backend("tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dropout(0.5)(keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b])))
    cls, reg = keras.layers.Dense(3)(h), keras.layers.Dense(1)(h)
    outputs = {"cls": cls, "reg": reg} if output_kind == "dict" else [cls, reg]
    return keras.Model({"a": a, "b": b}, outputs)


@pytest.mark.parametrize("output_kind, key", [("dict", "reg"), ("list", 1)])
@pytest.mark.parametrize("strategy", ["loop", "vectorized", "auto"])
def test_keras_dict_inputs_and_structured_outputs(output_kind, key, strategy):
    model = _keras_two_inputs(output_kind)
    x = {"a": np.ones((3, 4), np.float32), "b": np.full((3, 2), 0.5, np.float32)}
    samples = mcu.sample(model, x, 20, output=key, strategy=strategy, seed=0)
    assert samples.shape == (20, 3, 1) and samples.std(0).min() > 0
    with pytest.raises(mcu.InputError, match="available"):
        mcu.sample(model, x, 2, strategy=strategy)
    pred = mcu.predict(model, x, n_samples=10, task="regression", output=key, seed=0)
    assert pred.mean.shape[0] == 3
