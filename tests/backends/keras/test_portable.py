"""Keras 3 on JAX or PyTorch: loop and vectorized work, fast paths say why they are not used.

Runs only in a process started with ``KERAS_BACKEND=jax`` or ``KERAS_BACKEND=torch`` (Keras picks its backend
once, at import): ``KERAS_BACKEND=jax python -m pytest -q tests/backends/keras/test_portable.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import mcu
from tests.conftest import require_module

if os.environ.get("KERAS_BACKEND") not in ("jax", "torch"):
    pytest.skip("run with KERAS_BACKEND=jax or KERAS_BACKEND=torch", allow_module_level=True)
keras = require_module("keras")
from tests.conftest import keras_training_passes  # noqa: E402

L = keras.layers
T = 100  # the standard error of the ratio is still a few percent


def spread(samples):
    return float(np.std(np.asarray(samples, np.float64), axis=0).mean())


def snapshot(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]


def models():
    keras.utils.set_random_seed(0)
    i = keras.Input((16,))
    mlp = keras.Model(i, L.Dense(4)(L.Dropout(0.3)(L.Dense(32, activation="relu")(i))))
    j = keras.Input((3, 5))
    rnn = keras.Model(j, L.Dense(4)(L.LSTM(8, dropout=0.3, recurrent_dropout=0.3)(j)))
    k = keras.Input((5, 8))
    mha = keras.Model(k, L.Dense(4)(L.Flatten()(L.MultiHeadAttention(2, 4, dropout=0.3)(k, k))))
    return {"mlp": (mlp, (16,)), "lstm": (rnn, (3, 5)), "mha": (mha, (5, 8))}


@pytest.mark.parametrize("name", ["mlp", "lstm", "mha"])
def test_loop_and_vectorized_match_the_literal_recipe(name):
    model, shape = models()[name]
    x = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
    before = snapshot(model)
    strategies = ("loop", "vectorized")
    runs = {s: mcu.sample(model, x, T, seed=1, strategy=s, return_info=True) for s in strategies}
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(model)))
    keras.utils.set_random_seed(2)
    theirs = spread(keras_training_passes(keras, model, x, T))
    for strategy, (samples, info) in runs.items():
        assert 0.8 <= spread(samples) / theirs <= 1.25, strategy
    _, auto = mcu.sample(model, x, 8, return_info=True)
    assert "need Keras on TensorFlow" in auto.strategy_reason
    np.testing.assert_allclose(mcu.sample(model, x, 5, seed=3, strategy="loop"),
                               mcu.sample(model, x, 5, seed=3, strategy="loop"))


def test_prefix_falls_back_and_says_why():
    model, shape = models()["mlp"]
    x = np.ones((2, *shape), np.float32)
    samples, info = mcu.sample(model, x, 4, strategy="prefix", return_info=True)
    assert info.strategy == "vectorized" and f"runs on {keras.backend.backend()!r}" in info.strategy_reason
    assert samples.shape == (4, 2, 4)


def test_passes_are_compiled_on_jax_and_say_so():
    model, shape = models()["mlp"]
    _, info = mcu.sample(model, np.ones((2, *shape), np.float32), 4, strategy="prefix", return_info=True)
    expected = "compiled with jax.jit" if keras.backend.backend() == "jax" else "eager, not compiled"
    assert expected in info.strategy_reason


def test_low_precision_is_refused_clearly():
    model, shape = models()["mlp"]
    with pytest.raises(mcu.InputError, match=r"precision: 'bf16' .*needs Keras on TensorFlow.*precision='fp32'"):
        mcu.sample(model, np.ones((2, *shape), np.float32), 3, precision="bf16")


def test_a_keras_variable_input_gives_the_samples_of_its_value():
    model, shape = models()["mlp"]
    x = np.random.default_rng(4).standard_normal((3, *shape)).astype(np.float32)
    np.testing.assert_array_equal(mcu.sample(model, keras.Variable(x, trainable=False), 5, seed=2),
                                  mcu.sample(model, x, 5, seed=2))
