"""The Keras fast dropout path (mcu/backends/keras/masks.py): exact per-sample Bernoulli masks from Philox bits.

Statistical checks use fixed keys/seeds (deterministic) and bounds of ~4.5 standard errors.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import mcu

from tests.conftest import require_module, require_tensorflow_graph

keras = require_tensorflow_graph("the split's per-sample masks")
tf = require_module("tensorflow")

from mcu.backends.keras import masks as km  # noqa: E402
from mcu.backends.keras import split as keras_split  # noqa: E402
from mcu.backends.keras import KerasBackend  # noqa: E402

L = keras.layers
KEEPS = (0.5, 0.75, 0.9, 0.3, 0.123)


def keys(*seeds):
    return tf.unstack(km.sample_keys(seeds))


def z_score(hits: float, n: int, p: float) -> float:
    return (hits - n * p) / np.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------------------------------- masks
def test_keep_plan_uses_few_bits_for_dyadic_rates_and_ties_otherwise():
    assert km.keep_plan(Fraction(1, 2)) == (1, 1, 0)
    assert km.keep_plan(Fraction(3, 4)) == (2, 3, 0)
    assert km.keep_plan(Fraction(13, 16)) == (4, 13, 0)
    assert km.keep_plan(Fraction(77, 256)) == (8, 77, 0)
    assert km.keep_plan(Fraction(77, 65536)) == (16, 77, 0)
    bits, threshold, rest = km.keep_plan(1 - Fraction(0.1))
    assert bits == 16 and rest > 0
    assert Fraction(threshold * 2**64 + rest, 2**80) == Fraction(int((1 - Fraction(0.1)) * 2**80), 2**80)


@pytest.mark.parametrize("keep", KEEPS)
def test_keep_probability_per_sample_and_overall(keep):
    n_rows, m = 8, 40_000
    mask = km.keep_mask(keys(*range(100, 100 + n_rows)), m, Fraction(keep), region=0).numpy()
    assert mask.shape == (n_rows, m) and set(np.unique(mask)) <= {0.0, 1.0}
    assert abs(z_score(mask.sum(), mask.size, keep)) < 4.5
    for row in mask:  # each sample on its own (8 tests: a 4.5-sigma bound is still ~5e-5 per test)
        assert abs(z_score(row.sum(), m, keep)) < 4.5


@pytest.mark.parametrize("keep", (0.5, 0.3))
def test_masks_of_different_samples_are_independent(keep):
    mask = km.keep_mask(keys(*range(6)), 30_000, Fraction(keep), region=0).numpy()
    both = keep * keep
    for i in range(6):
        for j in range(i + 1, 6):
            assert abs(z_score((mask[i] * mask[j]).sum(), mask.shape[1], both)) < 4.5
    # neighbouring elements of one sample are independent too (the bits of one word are split up)
    assert abs(z_score((mask[:, 1:] * mask[:, :-1]).sum(), mask[:, 1:].size, both)) < 4.5


def test_regions_give_independent_draws_for_one_sample():
    a = km.keep_mask(keys(7), 30_000, Fraction(1, 2), region=0).numpy()[0]
    b = km.keep_mask(keys(7), 30_000, Fraction(1, 2), region=4).numpy()[0]
    assert abs(z_score((a * b).sum(), a.size, 0.25)) < 4.5


@pytest.mark.parametrize("keep", KEEPS)
def test_a_sample_mask_does_not_depend_on_the_other_samples_of_the_pass(keep):
    alone = km.keep_mask(keys(11), 5_000, Fraction(keep), region=8).numpy()
    grouped = km.keep_mask(keys(3, 11, 5), 5_000, Fraction(keep), region=8).numpy()
    np.testing.assert_array_equal(grouped[1], alone[0])
    assert not np.array_equal(grouped[0], grouped[1])


def test_ties_are_resolved_with_the_remaining_bits_also_beyond_the_pool():
    """Every element a tie: the second stage alone decides, with probability rest / 2**64; a row of 3000 ties
    overflows the per-sample pool (2 * 1 + 16 pairs), so the overflow words are used too."""
    keep = 1 - Fraction(0.123)
    _, _, rest = km.keep_plan(keep)
    p = rest / 2**64
    m, rows = 3000, 4
    below = tf.zeros((rows, m), tf.bool)
    ties = tf.ones((rows, m), tf.bool)
    pool = lambda seeds: tf.reshape(km.philox_words(keys(*seeds), 2 * km._pool_size(m), 1), [len(seeds), -1, 2])  # noqa: E731
    out = km._resolve_ties(below, ties, pool(range(rows)), keys(*range(rows)), rest, region=0).numpy()
    assert abs(z_score(out.sum(), out.size, p)) < 4.5
    alone = km._resolve_ties(below[:1], ties[:1], pool([2]), keys(2), rest, region=0).numpy()
    np.testing.assert_array_equal(out[2], alone[0])
    partial = np.zeros((1, m), bool)
    partial[0, ::7] = True  # fewer ties: the pool only
    few = km._resolve_ties(below[:1], tf.constant(partial), pool([1]), keys(1), rest, region=0).numpy()
    assert not few[0, ~partial[0]].any()


# ---------------------------------------------------------------------------------------------------- layers
def run_fast(layer, x, seeds, broadcast=True):
    """``len(seeds)`` samples of ``layer`` on the rows of ``x`` through fast_dropout: ``(k, N, ...)``."""
    layer.build(x.shape)
    k = len(seeds)
    inputs = tf.constant(x) if broadcast else tf.tile(tf.constant(x), [k] + [1] * (x.ndim - 1))
    out, _ = km.fast_dropout(inputs, layer, keys(*seeds), k, broadcast, region=0)
    return out.numpy().reshape((k,) + x.shape)


def test_dropout_values_are_x_times_scale_or_zero_and_broadcasting_changes_nothing():
    x = np.random.default_rng(0).uniform(1, 2, (5, 400)).astype(np.float32)
    layer = L.Dropout(0.3)
    out = run_fast(layer, x, range(4))
    scaled = x * np.float32(1 / (1 - 0.3))
    kept = out != 0
    assert abs(z_score(kept.sum(), kept.size, 0.7)) < 4.5
    np.testing.assert_array_equal(out[kept], np.broadcast_to(scaled, out.shape)[kept])
    np.testing.assert_array_equal(out, run_fast(layer, x, range(4), broadcast=False))


@pytest.mark.parametrize("dtype", ("float32", "float16", "float64"))
def test_dropped_elements_are_exactly_zero_even_for_non_finite_inputs(dtype):
    """As Keras' where(keep, x * scale, 0): a dropped inf or NaN gives +0.0 (an AND of the bits, no multiply)."""
    x = np.full((2, 300), np.inf, dtype)
    x[:, ::2] = np.nan
    out = run_fast(L.Dropout(0.5, dtype=dtype), x, range(3))
    assert out.dtype == dtype
    dropped = (out == 0)
    assert 0.3 < dropped.mean() < 0.7 and not np.signbit(out[dropped]).any()
    assert np.isnan(out[:, :, ::2][~dropped[:, :, ::2]]).all() and np.isinf(out[:, :, 1::2][~dropped[:, :, 1::2]]).all()


def test_noise_shape_shares_the_mask_along_its_unit_axes():
    x = np.ones((4, 5, 300), np.float32)
    out = run_fast(L.Dropout(0.5, noise_shape=(None, 1, 300)), x, range(3))
    assert (out == out[:, :, :1]).all()  # the same mask along axis 1
    kept = out[:, :, 0] != 0
    assert abs(z_score(kept.sum(), kept.size, 0.5)) < 4.5
    shared = run_fast(L.Dropout(0.5, noise_shape=(1, 5, 300)), x, range(3))
    assert (shared == shared[:, :1]).all()  # batch axis 1: one mask for the N rows of a sample ...
    assert not np.array_equal(shared[0], shared[1])  # ... but a new one per sample


@pytest.mark.parametrize("data_format", ("channels_last", "channels_first"))
def test_spatial_dropout_drops_whole_channels(data_format):
    shape = (3, 6, 5, 200) if data_format == "channels_last" else (3, 200, 6, 5)
    x = np.random.default_rng(1).uniform(1, 2, shape).astype(np.float32)
    out = run_fast(L.SpatialDropout2D(0.25, data_format=data_format), x, range(5))
    channel_axis = 4 if data_format == "channels_last" else 2
    spatial = tuple(a for a in (2, 3, 4) if a != channel_axis)
    kept = (out != 0)
    assert (kept.all(axis=spatial) == kept.any(axis=spatial)).all()  # all or nothing per (sample, row, channel)
    per_channel = kept.any(axis=spatial)
    assert abs(z_score(per_channel.sum(), per_channel.size, 0.75)) < 4.5
    np.testing.assert_allclose(out[kept], (np.broadcast_to(x, out.shape) / 0.75)[kept], rtol=1e-6)


def test_spatial_dropout_1d_and_3d():
    x = np.ones((2, 7, 300), np.float32)
    out = run_fast(L.SpatialDropout1D(0.5), x, range(3))
    assert (out == out[:, :, :1]).all() and 0.3 < (out[:, :, 0] != 0).mean() < 0.7
    x3 = np.ones((2, 3, 3, 3, 300), np.float32)
    out3 = run_fast(L.SpatialDropout3D(0.5), x3, range(3))
    assert (out3 == out3[:, :, :1, :1, :1]).all() and 0.3 < (out3 != 0).mean() < 0.7


def test_rate_zero_and_one():
    x = np.ones((2, 10), np.float32)
    same, still_broadcast = km.fast_dropout(tf.constant(x), L.Dropout(0.0), keys(1, 2, 3), 3, True, region=0)
    assert still_broadcast is True  # nothing to do: the frontier stays unrepeated
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(run_fast(L.Dropout(1.0), x, range(3)), np.zeros((3, 2, 10)))


# ---------------------------------------------------------------------------------------------------- models
def mixed_model():
    """SpatialDropout2D (keep 0.75: 2-bit fields) then Dropout 0.3 (non-dyadic: 16-bit fields and ties)."""
    keras.utils.set_random_seed(21)
    inputs = keras.Input((8, 8, 2))
    h = L.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    h = L.SpatialDropout2D(0.25)(h)
    h = L.Dense(12, activation="relu")(L.Flatten()(L.Conv2D(4, 3, padding="same")(h)))
    h = L.Dropout(0.3)(h)
    return keras.Model(inputs, L.Dense(3)(h))


def image(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 2)).astype(np.float32)


def test_split_uses_the_fast_path_for_every_dropout():
    model = mixed_model()
    split, reason = keras_split.prefix_split(model, image(3))
    assert split is not None, reason
    assert split.native_rng is False and "fast per-sample masks in 2 of 2" in reason


def test_seeded_samples_do_not_depend_on_the_grouping():
    model, x = mixed_model(), image(3)
    reference = mcu.sample(model, x, 11, strategy="prefix", chunk_size=3, seed=9)  # one sample per pass
    for strategy, rows in (("prefix", 3 * 4), ("prefix", 3 * 11), ("parallel", 3 * 2), ("auto", None)):
        np.testing.assert_array_equal(mcu.sample(model, x, 11, strategy=strategy, chunk_size=rows, seed=9), reference)
    assert not np.allclose(reference[0], reference[1])
    assert not np.allclose(mcu.sample(model, x, 11, strategy="prefix", seed=10), reference)


def test_adapter_takes_the_unrepeated_frontier_or_stacked_copies_alike():
    model, x = mixed_model(), image(3)
    backend = KerasBackend()
    with backend.mc_mode(model):
        split, _ = backend.split(model, tf.constant(x))
        frontier = split.prefix(tf.constant(x))
        keys = backend.generators(model, [5, 6, 7, 8])
        broadcast = split.suffix(frontier, keys)
        stacked = split.suffix([backend.repeat(f, 4) for f in frontier], keys)
        alone = split.suffix(frontier, backend.generators(model, [7]))
    assert split.repeats_frontier and broadcast.shape == (12, 3)
    np.testing.assert_array_equal(broadcast, stacked)
    np.testing.assert_array_equal(broadcast[6:9], alone)


def _distribution_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    z = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return float(np.abs(z).max()), float(b.var(0).sum() / a.var(0).sum())


def test_fast_path_samples_the_loop_distribution_and_the_check_has_power():
    """12 outputs, T=400: max |z| < 4.5 (under the null ~1e-4 over 12 outputs) and summed variances within
    [0.8, 1.25]. Negative control: the same weights with Dropout 0.15 instead of 0.3 must fail the check."""
    model, x = mixed_model(), image(4, seed=3)
    t = 400
    loop = mcu.sample(model, x, t, strategy="loop", seed=1)
    fast = mcu.sample(model, x, t, strategy="prefix", seed=2)
    z, ratio = _distribution_gap(loop, fast)
    assert z < 4.5 and 0.8 < ratio < 1.25
    other = mixed_model()
    other.layers[-2].rate = 0.15
    other.set_weights(model.get_weights())
    z_other, ratio_other = _distribution_gap(loop, mcu.sample(other, x, t, strategy="prefix", seed=2))
    assert z_other > 4.5 or not 0.8 < ratio_other < 1.25


def test_a_changed_rate_is_seen_by_the_next_call():
    model, x = mixed_model(), image(2)
    mcu.sample(model, x, 4, strategy="prefix", seed=0)
    spatial, drop = [layer for layer in model.layers if isinstance(layer, L.Dropout)]
    spatial.rate = 0.0  # no longer a site: an identity, and the prefix now runs through it
    samples, info = mcu.sample(model, x, 4, strategy="prefix", seed=0, return_info=True)
    assert "fast per-sample masks in 1 of 1" in info.strategy_reason and "from 'dropout" in info.strategy_reason
    assert not np.allclose(samples[0], samples[1])
    drop.rate = 0.0
    with pytest.raises(mcu.NoDropoutError, match="rate 0"):
        mcu.sample(model, x, 4, strategy="prefix", seed=0)


def test_dropout_without_a_fast_path_runs_natively():
    """AlphaDropout, and a Dropout inside a subclassed layer, keep drawing from their Keras seed generators."""

    class Noisy(L.Layer):
        def __init__(self):
            super().__init__()
            self.drop = L.Dropout(0.5)

        def call(self, x, training=False):
            return self.drop(x, training=training)

    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    h = L.Dense(16, activation="selu")(inputs)
    h = Noisy()(L.Dropout(0.5)(h))
    h = L.AlphaDropout(0.2)(L.Dense(16, activation="selu")(h))
    model = keras.Model(inputs, L.Dense(2)(h))
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    split, reason = keras_split.prefix_split(model, x)
    assert split is not None and split.native_rng is True
    assert "fast per-sample masks in 1 of 3" in reason and "AlphaDropout runs natively" in reason
    samples, info = mcu.sample(model, x, 8, strategy="prefix", seed=0, return_info=True)
    assert info.strategy == "prefix" and not np.allclose(samples[0], samples[1])
    np.testing.assert_array_equal(samples, mcu.sample(model, x, 8, strategy="prefix", seed=0))
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers())


# ---------------------------------------------------------------------------------------------------- memory
def test_activation_bytes_counts_layer_outputs_and_leaves_no_trace():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((784,)), L.Dense(512, activation="relu"), L.Dropout(0.5), L.Dense(10)])
    x = tf.constant(np.ones((64, 784), np.float32))
    backend = KerasBackend()
    assert backend.activation_bytes(lambda: None) is None  # outside mc_mode: no model to meter
    state = model.layers[1].seed_generator.state
    with backend.mc_mode(model):
        backend.forward(model, x)  # traced before: metering must run the Python anyway
        before = state.numpy().copy()
        full = backend.activation_bytes(lambda: backend.forward(model, x))
        np.testing.assert_array_equal(state.numpy(), before)  # traced, not run: no random numbers drawn
        split, _ = backend.split(model, x)
        frontier = split.prefix(x)
        suffix = backend.activation_bytes(lambda: split.suffix(frontier, backend.generators(model, [0, 1])))
        after = backend.forward(model, x)
    assert full == 64 * (512 + 512 + 10) * 4
    assert suffix == 2 * 64 * (512 + 10) * 4  # the masked copies and the last Dense; the frontier is not repeated
    assert after.shape == (64, 10) and not tf.config.functions_run_eagerly()
    assert all("call" not in layer.__dict__ for layer in model._flatten_layers())


def test_bf16_copy_draws_the_same_masks_as_fp32():
    """The masks depend on the sample keys only, not on the dtype: bf16 differs from fp32 by rounding alone."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((20,)), L.Dense(64, activation="relu"), L.Dropout(0.3),
                              L.Dense(32, activation="relu"), L.Dropout(0.5), L.Dense(3)])
    x = np.random.default_rng(0).standard_normal((5, 20)).astype(np.float32)
    low = mcu.sample(model, x, 50, precision="bf16", seed=1, strategy="prefix")
    full = mcu.sample(model, x, 50, precision="fp32", seed=1, strategy="prefix")
    other = mcu.sample(model, x, 50, precision="fp32", seed=2, strategy="prefix")
    assert np.abs(low - full).max() < 0.1 < np.abs(other - full).max()
