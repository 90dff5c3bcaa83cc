"""Concurrent sampling on one shared Keras model: no call affects another, and the model never changes.

Four threads sample the same model (seeded, so every result can be compared with the same call made alone)
while a fifth serves plain predictions (``model(x)`` and ``model.predict``). Zero problems means: every sample
set has spread and equals the one the same seeded call gives alone (to float rounding: passes may group rows
differently), every plain prediction equals the inference output, no exception, and the model's variables
(weights, moving statistics, seed-generator states) and attributes are byte-identical afterwards.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import require_module

import mcu

keras = require_module("keras")
L = keras.layers
# Keras on JAX detaches the model's variables while model.predict runs (its loop holds them), so nothing else
# may use the model meanwhile; plain inference beside the samplers is then model(x) only.
PREDICT_BESIDE = keras.backend.backend() != "jax"

SAMPLERS, CALLS, T = 4, 2, 16


def cnn():
    keras.utils.set_random_seed(11)
    i = keras.Input((8, 8, 2))
    bn = L.BatchNormalization()
    h = L.SpatialDropout2D(0.25)(L.ReLU()(bn(L.Conv2D(6, 3, padding="same")(i))))
    h = L.Dropout(0.5)(L.Dense(24, activation="relu")(L.Flatten()(L.MaxPooling2D()(h))))
    model = keras.Model(i, L.Dense(3)(h))
    bn.moving_mean.assign(np.linspace(-1, 1, 6).astype(np.float32))  # not the defaults: their use is visible
    bn.moving_variance.assign(np.linspace(0.5, 2, 6).astype(np.float32))
    return model


def sequence_model():
    keras.utils.set_random_seed(12)
    i = keras.Input((6, 8))
    h = L.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.2)(i, i)
    h = L.LSTM(8, dropout=0.3, recurrent_dropout=0.3)(h)
    return keras.Model(i, L.Dense(3)(L.Dropout(0.2)(h)))


def state(model):
    """Every variable's bytes (weights, moving statistics, seed-generator states) and every layer's attributes."""
    variables = {id(v): v for v in model.variables}
    for layer in model._flatten_layers(include_self=True):
        for generator in getattr(layer, "_seed_generators", ()):
            variables[id(generator.state)] = generator.state
    values = [v.numpy().tobytes() for v in variables.values()]
    attributes = [(layer.name, sorted(layer.__dict__)) for layer in model._flatten_layers(include_self=True)]
    return values, attributes


def run_concurrently(model, x, strategy, plain: bool):
    seeds = [[100 * i + c for c in range(CALLS)] for i in range(SAMPLERS)]
    alone = {s: mcu.sample(model, x, T, seed=s, strategy=strategy) for row in seeds for s in row}
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    if plain and PREDICT_BESIDE:
        model.predict(x, verbose=0)  # Keras adds its predict function to the model once: before the snapshot
    before = state(model)
    barrier = threading.Barrier(SAMPLERS + plain)

    def sampler(row):
        barrier.wait()
        return {s: mcu.sample(model, x, T, seed=s, strategy=strategy) for s in row}

    def predictions():
        barrier.wait()
        outs = []
        for i in range(12):
            use_predict = PREDICT_BESIDE and i % 2 == 0
            outs.append(model.predict(x, verbose=0) if use_predict else keras.ops.convert_to_numpy(model(x)))
        return outs

    with ThreadPoolExecutor(SAMPLERS + plain) as pool:
        futures = [pool.submit(sampler, row) for row in seeds]
        served = pool.submit(predictions) if plain else None
        results = [f.result() for f in futures]
        outs = served.result() if served else []
    for got in results:
        for s, samples in got.items():
            assert samples.shape == (T, *expected.shape)
            assert not np.allclose(samples[0], samples[1]), "a sample set without spread"
            np.testing.assert_allclose(samples, alone[s], rtol=1e-5, atol=1e-6, err_msg=f"seed {s}")
    for out in outs:  # plain inference never saw dropout
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert state(model) == before, "the model changed"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x, training=False)), expected)


@pytest.mark.parametrize("strategy", ["loop", "vectorized", "prefix", "auto"])
def test_threads_sampling_one_model_beside_plain_inference(strategy):
    model = cnn()
    x = np.random.default_rng(0).standard_normal((5, 8, 8, 2)).astype(np.float32)
    run_concurrently(model, x, strategy, plain=True)


@pytest.mark.parametrize("strategy", ["loop", "auto"])
def test_threads_sampling_a_model_with_attention_and_rnn_dropout(strategy):
    """RNN cells cache their dropout masks during a call: each pass keeps its own (in its context)."""
    model = sequence_model()
    x = np.random.default_rng(1).standard_normal((4, 6, 8)).astype(np.float32)
    run_concurrently(model, x, strategy, plain=False)


def test_asyncio_tasks_interleaving_sessions():
    """Sessions opened by concurrent asyncio tasks on one thread keep their own seeds (context variables)."""
    import asyncio

    from mcu.core.sampling import SamplingSession

    model = cnn()
    x = np.random.default_rng(2).standard_normal((3, 8, 8, 2)).astype(np.float32)
    alone = {s: mcu.sample(model, x, 8, seed=s, strategy="loop") for s in (1, 2)}

    async def task(seed):
        with SamplingSession(model, x, seed=seed, strategy="loop") as session:
            first = session.draw(4)
            await asyncio.sleep(0.01)  # the other task draws meanwhile, on the same thread
            return np.concatenate([first, session.draw(4)])

    async def main():
        return await asyncio.gather(task(1), task(2))

    one, two = asyncio.run(main())
    np.testing.assert_allclose(one, alone[1], rtol=1e-6)
    np.testing.assert_allclose(two, alone[2], rtol=1e-6)
