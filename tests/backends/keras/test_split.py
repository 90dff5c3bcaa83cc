"""Prefix caching for Keras graphs (mcu/backends/keras/split.py): where the cut goes, exactness, distribution."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import mcu

from tests.conftest import require_module, require_tensorflow_graph

keras = require_tensorflow_graph("the prefix split")
tf = require_module("tensorflow")

from mcu.backends.keras import precision  # noqa: E402
from mcu.backends.keras import split as keras_split  # noqa: E402
from mcu.backends.keras import KerasBackend  # noqa: E402

L = keras.layers


# ---------------------------------------------------------------------------------------------------- models
def mlp():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((784,)), L.Dense(512, activation="relu"), L.Dropout(0.5), L.Dense(10)])


def cnn():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((28, 28, 1))
    h = L.Conv2D(8, 3, padding="same")(inputs)
    h = L.BatchNormalization()(h)
    h = L.MaxPooling2D()(L.ReLU()(h))
    h = L.Conv2D(16, 3, padding="same")(h)
    h = L.BatchNormalization()(h)
    h = L.MaxPooling2D()(L.ReLU()(h))
    h = L.SpatialDropout2D(0.25)(h)
    h = L.Dense(32, activation="relu")(L.Flatten()(h))
    h = L.Dropout(0.5)(h)
    model = keras.Model(inputs, L.Dense(10)(h))
    batch = np.random.default_rng(1).standard_normal((16, 28, 28, 1)).astype(np.float32)
    for _ in range(3):  # non-trivial moving statistics, as after training
        model(batch, training=True)
    return model


def skip():
    """A deterministic tensor feeds both the prefix and the stochastic part; the raw input feeds the suffix too."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12,))
    a = L.Dense(24, activation="tanh")(inputs)
    b = L.Dense(24, activation="relu")(a)  # deterministic, built on a
    c = keras.ops.tanh(L.Dense(24)(L.Dropout(0.3)(b)))  # a bare keras.ops node in the stochastic part
    h = L.Concatenate()([L.Add()([a, c]), inputs])  # a and the input are consumed by the stochastic part
    return keras.Model(inputs, L.Dense(4)(h))


def nested():
    """A Sequential with dropout inside a Functional model, called twice (shared weights)."""
    keras.utils.set_random_seed(4)
    inner = keras.Sequential([
        keras.Input((16,)), L.Dense(32, activation="relu"), L.BatchNormalization(), L.Dropout(0.3), L.Dense(8),
    ])
    inputs = keras.Input((16,))
    left = inner(L.Dense(16)(inputs))
    right = inner(inputs)
    return keras.Model(inputs, L.Dense(3)(L.Concatenate()([left, right]))), inner


def every_kind():
    """Every dropout-family layer in one model (each kind must be patched and repeated correctly)."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((10, 6))
    h = L.Conv1D(8, 3, padding="same", activation="relu")(inputs)
    h = L.SpatialDropout1D(0.3)(h)
    h = L.GaussianDropout(0.3)(h)
    h = L.GlobalAveragePooling1D()(h)
    h = L.AlphaDropout(0.2)(L.Dense(16, activation="selu")(h))
    return keras.Model(inputs, L.Dense(5)(L.Dropout(0.2)(h)))


def vector(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def image(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 28, 28, 1)).astype(np.float32)


def draw(split, model, x, copies, seed):
    """``copies`` samples through the split, inside the backend's MC mode: shape ``(copies, N, *out)``."""
    backend = KerasBackend()
    with backend.mc_mode(model), backend.seeded(model, seed):
        frontier = split.prefix(x)
        out = np.asarray(split.suffix([backend.repeat(f, copies) for f in frontier]))
    n = len(next(iter(x.values())) if isinstance(x, dict) else x)
    return out.reshape((copies, n) + out.shape[1:])


def inbound_counts(model):
    return [len(layer._inbound_nodes) for layer in model._flatten_layers(include_self=True)]


# ---------------------------------------------------------------------------------------------------- the cut
def test_mlp_caches_the_first_dense_layer():
    model = mlp()
    split, reason = keras_split.prefix_split(model, vector(8, 784))
    assert split is not None, reason
    assert (split.n_prefix_ops, split.n_suffix_ops) == (1, 2)
    assert [tuple(t.shape) for t in split.frontier_tensors] == [(None, 512)]
    assert "dropout" in reason


def test_cnn_caches_everything_before_the_spatial_dropout():
    model = cnn()
    split, reason = keras_split.prefix_split(model, image(4))
    assert split is not None, reason
    assert split.n_prefix_ops == 8  # conv, BN, ReLU, pool, twice
    assert [tuple(t.shape) for t in split.frontier_tensors] == [(None, 7, 7, 16)]


def test_skip_connection_puts_shared_tensor_and_raw_input_in_the_frontier():
    model = skip()
    split, reason = keras_split.prefix_split(model, vector(5, 12))
    assert split is not None, reason
    frontier = split.frontier_tensors
    assert model.inputs[0] in frontier  # the input, consumed directly by the stochastic Concatenate
    a = model.layers[1].output
    b = model.layers[2].output
    assert a in frontier and b in frontier and len(frontier) == 3
    assert split.n_prefix_ops == 2


def test_nested_sequential_with_dropout_is_inlined_and_shared_calls_kept_apart():
    model, inner = nested()
    x = vector(6, 16)
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None, reason
    # outer Dense + (inner Dense, inner BN) for each of the two calls of the nested model
    assert split.n_prefix_ops == 5
    assert len(split.frontier_tensors) == 2 and all(t.shape == (None, 32) for t in split.frontier_tensors)
    frontier = split.prefix(x)
    assert not np.allclose(frontier[0], frontier[1])  # two calls: two different values for one KerasTensor


def test_dropout_first_has_nothing_to_cache():
    model = keras.Sequential([keras.Input((5,)), L.Dropout(0.2), L.Dense(3)])
    split, reason = keras_split.prefix_split(model, vector(2, 5))
    assert split is None and "no deterministic prefix" in reason


def test_unbuilt_sequential_is_not_split():
    split, reason = keras_split.split_model(keras.Sequential([L.Dense(3), L.Dropout(0.5)]))
    assert split is None and "no graph yet" in reason


def test_subclassed_model_is_not_split():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(8)
            self.drop = L.Dropout(0.5)
            self.out = L.Dense(2)

        def call(self, x, training=None):
            return self.out(self.drop(self.dense(x), training=training))

    model = Net()
    model(np.zeros((1, 3), np.float32))
    split, reason = keras_split.split_model(model)
    assert split is None and "subclassed" in reason


def test_layer_holding_a_dropout_is_stochastic_as_a_whole():
    class Block(L.Layer):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(8)
            self.drop = L.Dropout(0.5)

        def call(self, x):
            return self.drop(self.dense(x))

    inputs = keras.Input((4,))
    h = L.Dense(6)(inputs)
    model = keras.Model(inputs, L.Dense(2)(Block()(h)))
    x = vector(3, 4)
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None, reason
    assert split.n_prefix_ops == 1 and split.n_suffix_ops == 2
    assert len(split.dropout_layers) == 1
    a, b = draw(split, model, x, 2, seed=0)
    assert not np.allclose(a, b)


def test_batch_dependent_suffix_is_rejected_by_validation():
    inputs = keras.Input((4,))
    h = L.Dropout(0.3)(L.Dense(4)(inputs))
    row = L.Lambda(lambda t: t + keras.ops.cast(keras.ops.arange(keras.ops.shape(t)[0]), t.dtype)[:, None])(h)
    model = keras.Model(inputs, row)
    split, reason = keras_split.prefix_split(model, vector(3, 4))
    assert split is None and "differs from the full pass" in reason


def test_masks_cross_the_cut_as_frontier_tensors():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"), L.Embedding(20, 4, mask_zero=True), L.Dropout(0.3), L.LSTM(3),
    ])
    x = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0], [6, 7, 8, 9, 1, 0]], np.int32)
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None, reason
    assert [t.dtype for t in split.frontier_tensors] == ["float32", "bool"]
    theirs = mcu.sample(model, x, 5, strategy="vectorized", chunk_size=15, seed=1)
    np.testing.assert_allclose(draw(split, model, x, 5, seed=1), theirs, rtol=1e-4, atol=1e-5)


def test_a_deterministic_output_is_repeated_unchanged():
    keras.utils.set_random_seed(8)
    inputs = keras.Input((5,))
    h = L.Dense(6)(inputs)
    model = keras.Model(inputs, [L.Dense(2)(h), L.Dense(3)(L.Dropout(0.5)(h))])
    x = vector(4, 5)
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None, reason
    backend = KerasBackend()
    with backend.mc_mode(model), backend.seeded(model, 0):
        steady, noisy = split.suffix([backend.repeat(f, 3) for f in split.prefix(x)])
    np.testing.assert_allclose(np.asarray(steady), np.tile(np.asarray(model(x)[0]), (3, 1)), rtol=1e-5, atol=1e-6)
    assert noisy.shape == (12, 3) and not np.allclose(noisy[:4], noisy[4:8])


def test_multiple_inputs():
    keras.utils.set_random_seed(6)
    a_in, b_in = keras.Input((5,), name="a"), keras.Input((3,), name="b")
    h = L.Concatenate()([L.Dense(8)(a_in), b_in])
    model = keras.Model({"a": a_in, "b": b_in}, L.Dense(2)(L.Dropout(0.4)(h)))
    x = {"a": vector(4, 5), "b": vector(4, 3, seed=1)}
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None, reason
    backend = KerasBackend()  # mcu.sample takes one array: repeat the dict by hand for the reference
    with backend.mc_mode(model), backend.seeded(model, 2):
        full = np.asarray(backend.forward(model, {k: backend.repeat(tf.constant(v), 6) for k, v in x.items()}))
    np.testing.assert_allclose(draw(split, model, x, 6, seed=2).reshape(full.shape), full, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("build", [mlp, cnn, skip])
def test_prefix_is_bit_identical_to_a_full_pass(build):
    """Against ``keras.Model(inputs, frontier)`` compiled with tf.function, as the backend runs full passes.

    (Eager execution is not bit-identical to *any* compiled graph — grappler fuses e.g. MatMul+BiasAdd+Tanh —
    so the eager comparison is to float32 rounding only.)
    """
    model = build()
    x = image(16) if build is cnn else vector(16, model.inputs[0].shape[1])
    split, _ = keras_split.prefix_split(model, x)
    reference = keras.Model(model.inputs[0], split.frontier_tensors)
    as_list = lambda out: list(out) if isinstance(out, (list, tuple)) else [out]  # noqa: E731
    compiled = as_list(tf.function(lambda t: reference(t, training=False))(tf.constant(x)))
    eager = as_list(reference(x, training=False))
    ours = split.prefix(x)
    assert len(ours) == len(compiled) == len(split.frontier_tensors)
    for got, want, near in zip(ours, compiled, eager):
        assert got.shape == want.shape and np.array_equal(got, want)
        np.testing.assert_allclose(got, near, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [mlp, cnn, skip, lambda: nested()[0], every_kind])
def test_same_seed_gives_the_vectorized_strategy_samples(build):
    """Same seed state, same shapes at every dropout layer -> the same masks as repeating the whole input."""
    model = build()
    if build is every_kind:
        x = np.random.default_rng(0).standard_normal((4, 10, 6)).astype(np.float32)
    else:
        x = image(4) if build is cnn else vector(4, model.inputs[0].shape[1])
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None, reason
    ours = draw(split, model, x, 12, seed=7)
    theirs = mcu.sample(model, x, 12, strategy="vectorized", chunk_size=12 * len(x), seed=7)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ours[0], ours[1])


@pytest.mark.parametrize("build", [mlp, cnn])
def test_distribution_matches_the_loop_strategy(build):
    """Mean and variance over T=300 agree with plain loop sampling within Monte Carlo error.

    With ~40 outputs, max |z| of the mean difference stays below 4.5 (a two-sided 4.5 sigma event has
    probability ~7e-6 per output, ~3e-4 over 40 even if independent). The summed variances agree within
    [0.8, 1.25]: one variance from 300 draws has a ~8% standard error, the sum over the outputs of 4
    independent rows ~4%, the ratio of two sums ~6%, so the bounds are ~4 standard errors (fixed seeds;
    seen: max |z| 1.8-3.2 and ratios 0.96-1.01 over four seed pairs).
    """
    model = build()
    x = image(4) if build is cnn else vector(4, 784)
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None, reason
    T = 300
    ours = draw(split, model, x, T, seed=11).reshape(T, -1)
    loop = mcu.sample(model, x, T, strategy="loop", seed=12).reshape(T, -1)
    assert ours.shape[1] == 40
    z = (ours.mean(0) - loop.mean(0)) / np.sqrt((ours.var(0, ddof=1) + loop.var(0, ddof=1)) / T)
    assert np.max(np.abs(z)) < 4.5
    ratio = ours.var(0, ddof=1).sum() / loop.var(0, ddof=1).sum()
    assert 0.8 <= ratio <= 1.25


# ---------------------------------------------------------------------------------------------------- hygiene
def test_split_leaves_the_model_untouched_and_is_mode_safe():
    model = cnn()
    x = image(3)
    before = inbound_counts(model)
    weights = [v.numpy().copy() for v in model.variables]
    split, _ = keras_split.prefix_split(model, x)
    outside_first = np.asarray(split.suffix(split.prefix(x)))  # traced outside mc_mode: deterministic
    a, b = draw(split, model, x, 2, seed=0)  # inside mc_mode: a fresh trace, stochastic
    assert not np.allclose(a, b)
    np.testing.assert_allclose(np.asarray(split.suffix(split.prefix(x))), outside_first)  # still deterministic
    np.testing.assert_allclose(outside_first, np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-6)
    assert inbound_counts(model) == before
    assert all(np.array_equal(v.numpy(), w) for v, w in zip(model.variables, weights))
    assert not any("call" in layer.__dict__ for layer in model._flatten_layers(include_self=True))


def test_validation_inside_mc_mode_changes_nothing_and_draws_nothing():
    model = mlp()
    backend = KerasBackend()
    drop = model.layers[1]
    state = drop.seed_generator.state.numpy().copy()
    with backend.mc_mode(model), backend.seeded(model, 3):
        split, reason = keras_split.prefix_split(model, vector(5, 784))
        assert split is not None, reason
        assert "call" not in drop.__dict__  # nothing is patched on the model
        np.testing.assert_array_equal(drop.seed_generator.state.numpy(), state)


def test_the_cache_does_not_keep_the_model_alive():
    model = mlp()
    keras_split.prefix_split(model, vector(2, 784))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("build", [mlp, cnn])
def test_bf16_clone_is_close_and_leaves_the_global_policy_alone(build):
    model = build()
    x = image(8) if build is cnn else vector(8, 784)
    policy = keras.config.dtype_policy().name
    clone = precision.bf16_clone(model)
    assert clone is not None and clone is not model
    assert keras.config.dtype_policy().name == policy
    assert precision.bf16_clone(model) is clone  # cached
    assert clone.layers[-1].compute_dtype == "bfloat16"
    full = np.asarray(model(x, training=False))
    low = tf.cast(clone(x, training=False), tf.float32).numpy()
    assert np.max(np.abs(low - full)) / np.max(np.abs(full)) < 3e-2
    split, reason = keras_split.prefix_split(clone, x)  # the two speed-ups combine
    assert split is not None, reason


def test_bf16_clone_recurses_into_nested_models_and_follows_weight_updates():
    model, inner = nested()
    x = vector(4, 16)
    clone = precision.bf16_clone(model)
    assert {layer.compute_dtype for layer in clone._flatten_layers(include_self=False)} == {"bfloat16"}
    kernel = model.layers[-1].kernel
    kernel.assign(kernel.numpy() * 2.0)  # "trained further"
    low = tf.cast(precision.bf16_clone(model)(x, training=False), tf.float32).numpy()
    full = np.asarray(model(x, training=False))
    assert np.max(np.abs(low - full)) / np.max(np.abs(full)) < 3e-2


def test_bf16_clone_of_a_subclassed_model_is_none():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Net()
    model(np.zeros((1, 3), np.float32))
    assert precision.bf16_clone(model) is None
