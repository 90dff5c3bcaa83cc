"""Keras-only guarantees: every dropout-family layer, nested and subclassed models, no trace left behind."""

from __future__ import annotations

import numpy as np
import pytest

import mcu

from tests.conftest import require_module, tensorflow_graph_only

keras = require_module("keras")
L = keras.layers


def test_every_keras_dropout_kind_is_found_and_active():
    from mcu.backends import get_backend

    inputs = keras.Input((4, 4, 4, 2))
    h = L.SpatialDropout3D(0.3)(inputs)
    h = L.Reshape((16, 8))(h)
    h = L.SpatialDropout1D(0.3)(h)
    h = L.Reshape((4, 4, 8))(h)
    h = L.SpatialDropout2D(0.3)(h)
    h = L.Flatten()(h)
    h = L.GaussianDropout(0.3)(h)
    h = L.AlphaDropout(0.3)(h)
    h = L.Dropout(0.3)(h)
    model = keras.Model(inputs, L.Dense(3)(h))
    assert len(get_backend("tensorflow").dropout_layers(model)) == 6
    samples = mcu.sample(model, np.ones((2, 4, 4, 4, 2), np.float32), 4, seed=0)
    assert samples.shape == (4, 2, 3) and not np.allclose(samples[0], samples[1])


def test_layers_inside_subclassed_models_are_found():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(8)
            self.drop = L.Dropout(0.5)

        def call(self, x):
            return self.drop(self.dense(x))

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.out = L.Dense(2)

        def call(self, x):
            return self.out(self.block(x))

    model = Net()
    model(np.zeros((1, 3), np.float32))
    samples = mcu.sample(model, np.ones((2, 3), np.float32), 5, seed=0)
    assert not np.allclose(samples[0], samples[1])


def test_a_layer_used_twice_counts_once_in_the_weight_bytes():
    from mcu.backends import get_backend

    shared = keras.layers.Dense(32)
    inputs = keras.Input((32,))
    outputs = shared(keras.layers.Dropout(0.5)(shared(inputs)))
    model = keras.Model(inputs, outputs)
    assert get_backend("tensorflow").weight_bytes(model) == (32 * 32 + 32) * 4


def test_seed_state_and_call_attributes_are_restored():
    model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.Dropout(0.5), L.Dense(2)])
    drop = model.layers[1]
    state = drop.seed_generator.state.numpy().copy()
    mcu.sample(model, np.ones((2, 3), np.float32), 3, seed=1)
    mcu.sample(model, np.ones((2, 3), np.float32), 3)
    np.testing.assert_array_equal(drop.seed_generator.state.numpy(), state)
    assert "call" not in drop.__dict__
    # outside mcu the model is back to normal inference: deterministic
    x = np.ones((2, 3), np.float32)
    plain = keras.ops.convert_to_numpy
    np.testing.assert_array_equal(plain(model(x, training=False)), plain(model(x, training=False)))


@tensorflow_graph_only(keras, "the mixed-precision copy")
def test_bf16_runs_on_a_copy_and_leaves_the_model_and_policy_alone():
    model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.Dropout(0.5), L.Dense(2)])
    before = [w.numpy().copy() for w in model.weights]
    policy = keras.config.dtype_policy().name
    x = np.ones((5, 3), np.float32)
    low = mcu.sample(model, x, 400, precision="bf16", seed=0)
    full = mcu.sample(model, x, 400, precision="fp32", seed=0)
    assert low.dtype == np.float32 and low.shape == (400, 5, 2)
    se = np.sqrt(low.var(0) / 400 + full.var(0) / 400)
    assert (np.abs(low.mean(0) - full.mean(0)) < 4.5 * se + 1e-2).all()  # bf16 rounding is within MC noise
    assert keras.config.dtype_policy().name == policy
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    assert model.dtype_policy.name == "float32"


@tensorflow_graph_only(keras, "the mixed-precision copy")
def test_low_precision_on_a_subclassed_keras_model_is_refused_clearly():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.d = L.Dense(4), L.Dropout(0.5)

        def call(self, x):
            return self.d(self.a(x))

    model = Net()
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(mcu.InputError, match="precision: 'bf16' .*Functional or Sequential"):
        mcu.sample(model, np.ones((2, 3), np.float32), 3, precision="bf16")


@tensorflow_graph_only(keras, "the mixed-precision copy")
def test_fp16_warns_without_native_support():
    from mcu.backends.keras.backend import _native_fp16

    if _native_fp16():
        pytest.skip("this machine has native fp16")
    model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.Dropout(0.5), L.Dense(2)])
    with pytest.warns(RuntimeWarning, match="no native float16"):
        mcu.sample(model, np.ones((2, 3), np.float32), 3, precision="fp16")


def _functional_cnn():
    inputs = keras.Input((12, 12, 1))
    h = L.MaxPooling2D()(L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))))
    h = L.Dropout(0.5)(L.Dense(16, activation="relu")(L.Flatten()(h)))
    return keras.Model(inputs, L.Dense(3)(h))


def _gaussian_cnn():
    """As _functional_cnn, but the dropout after the cut is a GaussianDropout: no fast per-sample path."""
    inputs = keras.Input((12, 12, 1))
    h = L.MaxPooling2D()(L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))))
    h = L.GaussianDropout(0.5)(L.Dense(16, activation="relu")(L.Flatten()(h)))
    return keras.Model(inputs, L.Dense(3)(h))


@tensorflow_graph_only(keras, "the prefix split")
def test_prefix_strategy_runs_on_functional_models_and_auto_explains():
    model = _functional_cnn()
    x = np.random.default_rng(0).standard_normal((5, 12, 12, 1)).astype(np.float32)
    samples, info = mcu.sample(model, x, 30, strategy="prefix", seed=0, return_info=True)
    assert info.strategy == "prefix" and "split" in info.strategy_reason
    assert "fast per-sample masks in 1 of 1" in info.strategy_reason
    assert samples.shape == (30, 5, 3) and not np.allclose(samples[0], samples[1])
    _, auto = mcu.sample(model, x, 30, return_info=True)
    assert "probe" in auto.strategy_reason
    # seeded: every dropout draws from per-sample keys, so auto may time configurations that all return the
    # same samples (any copies per pass, any workers)
    first, seeded = mcu.sample(model, x, 30, seed=3, return_info=True)
    assert seeded.strategy in ("prefix", "parallel") and "probe" in seeded.strategy_reason
    np.testing.assert_array_equal(first, mcu.sample(model, x, 30, seed=3))
    np.testing.assert_array_equal(first, mcu.sample(model, x, 30, seed=3, strategy="prefix", chunk_size=5 * 7))


@tensorflow_graph_only(keras, "the prefix split's per-sample masks")
def test_seeded_auto_does_not_time_a_model_whose_dropout_has_no_fast_path():
    model = _gaussian_cnn()
    x = np.random.default_rng(0).standard_normal((5, 12, 12, 1)).astype(np.float32)
    first, seeded = mcu.sample(model, x, 30, seed=3, return_info=True)
    assert "without timing" in seeded.strategy_reason and "GaussianDropout runs natively" in seeded.strategy_reason
    np.testing.assert_array_equal(first, mcu.sample(model, x, 30, seed=3))


@tensorflow_graph_only(keras, "the prefix split's per-sample masks")
def test_parallel_on_keras_falls_back_to_prefix_when_some_dropout_is_native():
    x = np.ones((2, 12, 12, 1), np.float32)
    _, info = mcu.sample(_gaussian_cnn(), x, 6, strategy="parallel", seed=0, return_info=True)
    assert info.strategy == "prefix" and "shared random state" in info.strategy_reason


@tensorflow_graph_only(keras, "the prefix split")
def test_parallel_on_keras_gives_the_prefix_samples():
    model = _functional_cnn()
    x = np.random.default_rng(1).standard_normal((3, 12, 12, 1)).astype(np.float32)
    ours, info = mcu.sample(model, x, 13, strategy="parallel", workers=2, chunk_size=3 * 2, seed=4, return_info=True)
    assert info.strategy == "parallel"
    np.testing.assert_array_equal(ours, mcu.sample(model, x, 13, strategy="prefix", chunk_size=3 * 5, seed=4))


@tensorflow_graph_only(keras, "the reason the prefix split refuses a model")
def test_subclassed_model_cannot_be_split_and_falls_back():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.d, self.b = L.Dense(8), L.Dropout(0.5), L.Dense(2)

        def call(self, x):
            return self.b(self.d(self.a(x)))

    model = Net()
    model(np.zeros((1, 3), np.float32))
    _, info = mcu.sample(model, np.ones((2, 3), np.float32), 4, strategy="prefix", return_info=True)
    assert info.strategy == "vectorized" and "cannot be split" in info.strategy_reason


def _shared_mask_model(subclassed: bool = False):
    inputs = keras.Input((8,))
    dense = keras.layers.Dense(8, use_bias=False, kernel_initializer="identity")
    drop = keras.layers.Dropout(0.5, noise_shape=(1, 8))  # one mask for the whole batch, per pass
    if not subclassed:
        return keras.Model(inputs, drop(dense(inputs)))

    class Wrapped(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.drop = dense, drop

        def call(self, x, training=False):
            return self.drop(self.dense(x), training=training)

    return Wrapped()


@pytest.mark.parametrize("subclassed", [False, True])
@pytest.mark.parametrize("strategy", ["auto", "vectorized", "prefix", "parallel"])
def test_a_batch_shared_dropout_mask_is_never_shared_between_samples(strategy, subclassed):
    """noise_shape=(1, d): every example of a pass shares the mask; stacked copies must not share it."""
    model = _shared_mask_model(subclassed)
    x = np.ones((3, 8), np.float32)
    samples, info = mcu.sample(model, x, 64, strategy=strategy, seed=0, return_info=True)
    assert np.all(samples == samples[:, :1])  # within a sample (one pass), the examples share the mask
    masks = {tuple(s[0] > 0) for s in samples}
    assert len(masks) > 40  # 256 possible masks, ~57 distinct expected from 64 independent samples
    if strategy == "vectorized" or subclassed:
        assert info.strategy == "loop" and "share one mask across the batch" in info.strategy_reason
