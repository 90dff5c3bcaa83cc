"""Keras misuse that once poisoned later calls, passed silently or raised unexplained errors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require_module, tensorflow_graph_only

import mcu

keras = require_module("keras")
L = keras.layers


def cnn():
    keras.utils.set_random_seed(7)
    i = keras.Input((8, 8, 1))
    h = L.Dropout(0.5)(L.Dense(8, activation="relu")(L.Flatten()(L.Conv2D(4, 3)(i))))
    return keras.Model(i, L.Dense(3)(h))


def images(channels=1, n=4):
    return np.random.default_rng(0).standard_normal((n, 8, 8, channels)).astype(np.float32)


@tensorflow_graph_only(keras, "a tf.Variable input and the traced functions cached per input")
def test_a_variable_input_does_not_poison_later_calls():
    tf = require_module("tensorflow")
    model, x = cnn(), images()
    from_variable = mcu.sample(model, tf.Variable(x), 5, seed=0)
    for strategy in ("auto", "prefix", "loop"):
        np.testing.assert_allclose(mcu.sample(model, x, 5, seed=0, strategy=strategy).shape, (5, 4, 3))
    np.testing.assert_allclose(mcu.sample(model, x, 5, seed=0), from_variable, rtol=1e-5, atol=1e-6)
    assert mcu.predict(model, x, n_samples=5, seed=0).mean.shape == (4, 3)
    mcu.sample(model, tf.Variable(x), 5, seed=0, strategy="prefix")  # and the other way round
    mcu.sample(model, x, 5, strategy="prefix")


@pytest.mark.parametrize("strategy", ["loop", "vectorized", "auto", "prefix"])
def test_a_wrong_channel_count_after_a_valid_call_is_refused(strategy):
    model = cnn()
    mcu.sample(model, images(1), 3, strategy=strategy)
    with pytest.raises(mcu.InputError, match=r"x: the model rejected inputs of per-example shape \(8, 8, 2\)"):
        mcu.sample(model, images(2), 3, strategy=strategy)
    mcu.sample(model, images(1, n=2), 3, strategy=strategy)  # a valid call still works


class RaisingNet(keras.Model):
    def __init__(self, how):
        super().__init__()
        self.how, self.dense, self.drop = how, L.Dense(3), L.Dropout(0.5)

    def call(self, x):
        if self.how == "python":
            raise RuntimeError("the model's own bug")
        if self.how == "py_function":
            tf = require_module("tensorflow")

            def fail(_):
                raise RuntimeError("the model's own bug")

            y = tf.py_function(fail, [x], tf.float32)
            y.set_shape(x.shape)
            x = y
        return self.drop(self.dense(x))


@pytest.mark.parametrize("how", ["python", pytest.param("py_function", marks=tensorflow_graph_only(
    keras, "an exception raised inside a traced tf.py_function"))])
def test_an_exception_inside_the_model_says_the_model_raised(how):
    model = RaisingNet(how)
    model.dense.build((None, 3))
    with pytest.raises(mcu.InputError, match=r"model: RaisingNet raised (RuntimeError|UnknownError)") as caught:
        mcu.sample(model, np.ones((2, 3), np.float32), 3, strategy="loop")
    assert caught.value.__cause__ is not None and "own bug" in str(caught.value)


@pytest.mark.parametrize("outputs", ["list", "dict"])
@pytest.mark.parametrize("strategy", ["auto", "prefix", "loop"])
def test_several_outputs_need_output(outputs, strategy):
    i = keras.Input((3,))
    h = L.Dropout(0.5)(L.Dense(4)(i))
    out = [L.Dense(2)(h), L.Dense(1)(h)] if outputs == "list" else {"a": L.Dense(2)(h), "b": L.Dense(1)(h)}
    with pytest.raises(mcu.InputError, match=r"not one tensor; pass output=.*available"):
        mcu.sample(keras.Model(i, out), np.ones((2, 3), np.float32), 3, strategy=strategy)


@tensorflow_graph_only(keras, "tf.GradientTape")
@pytest.mark.parametrize("strategy", ["loop", "prefix"])
def test_sampling_inside_a_gradient_tape_records_nothing(strategy):
    tf = require_module("tensorflow")
    model = cnn()
    x = tf.constant(images())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        mcu.sample(model, x, 3, strategy=strategy)
    assert tape.watched_variables() == ()
