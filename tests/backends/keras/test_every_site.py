"""Every Keras dropout site is on while sampling, and nothing else: mcu against the literal recipe.

The oracle: on a model without batch statistics, ``mcu.sample`` samples the distribution of
``model(x, training=True)`` passes. The check compares the per-example spread (mean over examples and outputs
of the standard deviation over T = 200 samples, fixed seeds): the ratio of mcu's to the recipe's must lie in
[0.8, 1.25]. With T = 200 the standard deviation of one entry has a relative standard error of about
1/sqrt(2T) = 5%; averaged over all entries (correlated through shared masks) the ratio's noise stays a few
percent, so the band is a wide margin for a right answer and far too narrow for a missing site.

Negative control: every model also ends in a weak ``Dropout(0.05)`` (named ``tail``). Turning every other site
off in mcu's site table (as if mcu had missed them) must push the ratio out of the band: the check has the
power to see a site that stays off.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.conftest import keras_training_passes, require_module, tensorflow_graph_only

import mcu

keras = require_module("keras")
L = keras.layers

T = 200
BAND = (0.8, 1.25)
COPIES = 25  # copies of the batch per pass: few traced shapes, small traces


def spread(samples: np.ndarray) -> float:
    return float(np.std(np.asarray(samples, np.float64), axis=0).mean())


def literal(model, x, n: int = T) -> np.ndarray:
    """The recipe users follow: ``n`` passes with ``training=True`` (compiled once; each pass draws new masks)."""
    keras.utils.set_random_seed(1234)
    return keras_training_passes(keras, model, x, n)


def snapshot(model):
    return [v.numpy().copy() for v in model.variables], [sorted(layer.__dict__) for layer in
                                                          model._flatten_layers(include_self=True)]


def same(a, b) -> bool:
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(np.array_equal(p, q) for p, q in zip(a[0], b[0]))


def _head(h):
    return L.Dense(4, name="head")(L.Dropout(0.05, name="tail")(h))


def _seq(shape):
    return keras.Input(shape)


# ---- architectures: (inputs shape, builder) ------------------------------------------------------------------
def dropout_mlp():
    i = keras.Input((16,))
    return keras.Model(i, _head(L.Dropout(0.3)(L.Dense(32, activation="relu")(i))))


def spatial_1d():
    i = keras.Input((10, 6))
    return keras.Model(i, _head(L.Flatten()(L.SpatialDropout1D(0.3)(L.Conv1D(8, 3, activation="relu")(i)))))


def spatial_2d():
    i = keras.Input((8, 8, 3))
    return keras.Model(i, _head(L.Flatten()(L.SpatialDropout2D(0.3)(L.Conv2D(6, 3, activation="relu")(i)))))


def spatial_3d():
    i = keras.Input((4, 4, 4, 2))
    return keras.Model(i, _head(L.Flatten()(L.SpatialDropout3D(0.3)(L.Conv3D(4, 2, activation="relu")(i)))))


def gaussian_dropout():
    i = keras.Input((16,))
    return keras.Model(i, _head(L.GaussianDropout(0.3)(L.Dense(32, activation="relu")(i))))


def alpha_dropout():
    i = keras.Input((16,))
    return keras.Model(i, _head(L.AlphaDropout(0.2)(L.Dense(32, activation="selu")(i))))


def _rnn(layer):
    def build():
        i = keras.Input((6, 5))
        return keras.Model(i, _head(layer()(i)))

    build.__name__ = layer.__name__
    return build


def lstm():
    return L.LSTM(8, dropout=0.3, recurrent_dropout=0.3)


def gru():
    return L.GRU(8, dropout=0.3, recurrent_dropout=0.3)


def simple_rnn():
    return L.SimpleRNN(8, dropout=0.3, recurrent_dropout=0.3)


def lstm_input_dropout_only():
    return L.LSTM(8, dropout=0.3)


def bidirectional_lstm():
    return L.Bidirectional(L.LSTM(8, dropout=0.3, recurrent_dropout=0.3))


def stacked_cells():
    return L.RNN([L.LSTMCell(8, dropout=0.3), L.GRUCell(8, recurrent_dropout=0.3)])


def multi_head_attention():
    i = keras.Input((5, 8))
    h = L.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.3)(i, i)
    return keras.Model(i, _head(L.Flatten()(h)))


def attention():
    i = keras.Input((5, 8))
    h = L.Attention(dropout=0.3)([L.Dense(8)(i), i])
    return keras.Model(i, _head(L.Flatten()(h)))


def nested():
    inner_in = keras.Input((32,))
    inner = keras.Model(inner_in, L.Dense(16, activation="relu")(L.Dropout(0.3)(inner_in)), name="inner")
    i = keras.Input((16,))
    return keras.Model(i, _head(inner(L.Dense(32, activation="relu")(i))))


class DropBlock(L.Layer):
    """A custom layer that calls a Dropout sub-layer, passing its own ``training`` on."""

    def __init__(self, forward_training: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.dense, self.drop, self.forward_training = L.Dense(32, activation="relu"), L.Dropout(0.3), forward_training

    def call(self, x, training=None):
        if self.forward_training:
            return self.drop(self.dense(x), training=training)
        return self.drop(self.dense(x))  # no training argument: the call context decides


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.block, self.tail, self.out = DropBlock(), L.Dropout(0.05, name="tail"), L.Dense(4)

    def call(self, x, training=False):
        return self.out(self.tail(self.block(x, training=training), training=training))


def subclassed():
    model = SubclassedNet()
    model(np.zeros((1, 16), np.float32))
    return model


def custom_layer():
    i = keras.Input((16,))
    return keras.Model(i, _head(DropBlock()(i)))


def custom_layer_without_training_argument():
    i = keras.Input((16,))
    return keras.Model(i, _head(DropBlock(forward_training=False)(i)))


ARCHITECTURES = [
    (dropout_mlp, (16,)), (spatial_1d, (10, 6)), (spatial_2d, (8, 8, 3)), (spatial_3d, (4, 4, 4, 2)),
    (gaussian_dropout, (16,)), (alpha_dropout, (16,)),
    (_rnn(lstm), (6, 5)), (_rnn(gru), (6, 5)), (_rnn(simple_rnn), (6, 5)), (_rnn(lstm_input_dropout_only), (6, 5)),
    (_rnn(bidirectional_lstm), (6, 5)), (_rnn(stacked_cells), (6, 5)),
    (multi_head_attention, (5, 8)), (attention, (5, 8)),
    (nested, (16,)), (subclassed, (16,)), (custom_layer, (16,)), (custom_layer_without_training_argument, (16,)),
]


def _build(builder, shape, n: int = 6):
    keras.utils.set_random_seed(3)
    model = builder()
    x = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)
    return model, x


@pytest.fixture
def only_tail(monkeypatch):
    """mcu's site table with every site but the ``tail`` dropout removed (a sampler that misses sites)."""
    from mcu.backends.keras import switches

    original = switches.site_config
    monkeypatch.setattr(switches, "site_config",
                        lambda layer: original(layer) if layer.name == "tail" else None)


@pytest.mark.parametrize("builder, shape", ARCHITECTURES, ids=[b.__name__ for b, _ in ARCHITECTURES])
def test_every_site_matches_the_literal_recipe(builder, shape):
    model, x = _build(builder, shape)
    before = snapshot(model)
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no site left off, no warning about one
        # full passes (the forward path) and the split (its own executor; falls back to vectorized, and says
        # why, where the model cannot be split); explicit strategies: no timing probe in a unit test
        for seed, strategy in enumerate(("vectorized", "prefix")):
            runs[strategy] = mcu.sample(model, x, T, seed=seed, strategy=strategy, chunk_size=COPIES * len(x),
                                        return_info=True)
    assert same(before, snapshot(model)), "sampling changed the model"
    theirs = spread(literal(model, x))
    assert theirs > 1e-3
    for strategy, (samples, info) in runs.items():
        ratio = spread(samples) / theirs
        assert BAND[0] <= ratio <= BAND[1], f"{builder.__name__}/{strategy}: spread ratio {ratio:.3f} " \
                                            f"({info.strategy}: {info.strategy_reason})"


@pytest.mark.parametrize("builder, shape", ARCHITECTURES, ids=[b.__name__ for b, _ in ARCHITECTURES])
def test_negative_control_a_site_left_off_fails_the_check(builder, shape, only_tail):
    model, x = _build(builder, shape)
    theirs = spread(literal(model, x))
    ratio = spread(mcu.sample(model, x, T, seed=0, strategy="vectorized", chunk_size=COPIES * len(x))) / theirs
    assert not BAND[0] <= ratio <= BAND[1], f"{builder.__name__}: ratio {ratio:.3f} with the main sites off"


@tensorflow_graph_only(keras, "the prefix split runs through rate-0 layers")
def test_rate_zero_sites_are_identities_for_the_split():
    i = keras.Input((16,))
    h = L.Dropout(0.0)(L.Dense(32, activation="relu")(i))
    h = L.Dropout(0.3)(L.Dense(32, activation="relu")(L.LSTM(8, dropout=0.0)(L.Reshape((4, 8))(h))))
    model = keras.Model(i, L.Dense(4)(h))
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    _, info = mcu.sample(model, x, 8, strategy="prefix", seed=0, return_info=True)
    # the rate-0 Dropout and the LSTM without dropout are not sites: the prefix runs through both
    assert info.strategy == "prefix" and "from 'dropout" in info.strategy_reason
    assert "fast per-sample masks in 1 of 1" in info.strategy_reason


def test_a_model_with_only_rate_zero_sites_is_refused():
    for zero in (keras.Sequential([keras.Input((4,)), L.Dense(3), L.Dropout(0.0)]),
                 keras.Sequential([keras.Input((3, 4)), L.LSTM(3, dropout=0.0, recurrent_dropout=0.0)])):
        with pytest.raises(mcu.NoDropoutError, match="rate 0"):
            mcu.sample(zero, np.ones((2, *zero.inputs[0].shape[1:]), np.float32), 4)


def test_batch_norm_keeps_and_uses_its_moving_statistics():
    keras.utils.set_random_seed(4)
    i = keras.Input((8, 8, 2))
    bn = L.BatchNormalization()
    h = L.Flatten()(L.ReLU()(bn(L.Conv2D(4, 3)(i))))
    model = keras.Model(i, L.Dense(3)(L.Dropout(0.3)(L.Dense(16)(h))))  # linear after the dropout
    bn.moving_mean.assign(np.full(4, 2.0, np.float32))  # far from the batch statistics
    bn.moving_variance.assign(np.full(4, 9.0, np.float32))
    x = np.random.default_rng(1).standard_normal((6, 8, 8, 2)).astype(np.float32)
    inference = keras.ops.convert_to_numpy(model(x, training=False))
    with keras.StatelessScope():  # batch statistics, without writing the moving ones
        batch_stats = keras.ops.convert_to_numpy(model(x, training=True))
    before = snapshot(model)
    for strategy in ("auto", "loop", "vectorized", "prefix"):
        samples = mcu.sample(model, x, T, seed=0, strategy=strategy,
                             chunk_size=None if strategy == "auto" else COPIES * len(x))
        assert same(before, snapshot(model)), strategy
        # inverted dropout before a linear head: the mean of the samples is the inference output
        se = samples.std(0) / np.sqrt(T)
        assert (np.abs(samples.mean(0) - inference) < 5 * se + 1e-4).all(), strategy
        assert np.abs(samples.mean(0) - batch_stats).max() > 20 * se.max(), strategy
    ours = mcu.sample(model, x, 4, seed=0, mode="training")  # the literal recipe: statistics not written either
    assert ours.shape == (4, 6, 3) and same(before, snapshot(model))


def test_gaussian_noise_and_augmentation_stay_inactive():
    """Policy: GaussianNoise (additive noise, a form of augmentation) is not dropout and stays off."""
    keras.utils.set_random_seed(5)
    i = keras.Input((16,))
    noise = L.GaussianNoise(1.0)
    model = keras.Model(i, L.Dense(4)(L.Dropout(0.3)(L.Dense(32, activation="relu")(noise(i)))))
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    ours = spread(mcu.sample(model, x, T, seed=0))
    noise.stddev = 0.0  # the recipe without the noise: what mcu samples
    ratio = ours / spread(literal(model, x))
    assert BAND[0] <= ratio <= BAND[1]


def test_a_custom_random_layer_mcu_does_not_know_is_named_in_a_warning():
    class OwnDropout(L.Layer):
        def __init__(self):
            super().__init__()
            self.seed_generator = keras.random.SeedGenerator(1)

        def call(self, x, training=False):
            return keras.random.dropout(x, 0.5, seed=self.seed_generator) if training else x

    i = keras.Input((4,))
    model = keras.Model(i, L.Dropout(0.3)(OwnDropout()(L.Dense(4)(i))))
    with pytest.warns(Warning, match=r"own_dropout.*OwnDropout.*training=False"):
        mcu.sample(model, np.ones((2, 4), np.float32), 3)


def test_a_site_that_never_runs_is_reported():
    class Forgetful(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.drop, self.unused = L.Dense(3), L.Dropout(0.5), L.Dropout(0.5, name="unused")

        def call(self, x):
            return self.drop(self.dense(x))

    model = Forgetful()
    model(np.zeros((1, 3), np.float32))
    with pytest.warns(Warning, match=r"\['unused \(Dropout\)'\] did not run"):
        mcu.sample(model, np.ones((2, 3), np.float32), 3, strategy="loop")

    class Silent(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.drop = L.Dense(3), L.Dropout(0.5)

        def call(self, x):
            return self.dense(x)  # the dropout layer is never called

    model = Silent()
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(mcu.NoDropoutError, match="never ran"):
        mcu.sample(model, np.ones((2, 3), np.float32), 3, strategy="loop")


@tensorflow_graph_only(keras, "the reason the prefix split refuses a model")
def test_auto_says_why_a_model_cannot_be_split():
    model, x = _build(multi_head_attention, (5, 8))  # the attention (a site) reads the input directly
    samples, info = mcu.sample(model, x, 8, return_info=True)
    assert "no split" in info.strategy_reason and "first operation after every input is stochastic" in \
        info.strategy_reason and "multi_head_attention" in info.strategy_reason
    assert not np.allclose(samples[0], samples[1])
