"""The backend contract, run once per framework: shapes, exactness, no side effects, errors."""

from __future__ import annotations

import numpy as np
import pytest

import mcu
from mcu.backends import get_backend

STRATEGIES = ("loop", "vectorized", "prefix", "parallel", "auto")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_article_mlp_gives_samples_first_shape(models, rng, strategy):
    model = models.mlp()
    x = models.vector(rng, 6)
    samples = mcu.sample(model, x, 12, strategy=strategy, seed=0)
    assert samples.shape == (12, 6, 10)
    assert samples.dtype == np.float32
    assert np.isfinite(samples).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cnn_with_batchnorm_keeps_statistics_byte_identical(models, rng, strategy):
    model = models.cnn()
    before_stats, before = models.bn_stats(model), models.snapshot(model)
    samples = mcu.sample(model, models.image(rng, 5), 8, strategy=strategy, seed=1)
    assert samples.shape == (8, 5, 10)
    assert len(before_stats) > 0
    after_stats = models.bn_stats(model)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before_stats, after_stats))
    assert models.same(before, models.snapshot(model))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_samples_differ_when_dropout_is_active(models, rng, strategy):
    samples = mcu.sample(models.mlp(), models.vector(rng, 4), 5, strategy=strategy, seed=2)
    assert not np.allclose(samples[0], samples[1])


def test_dropout_rate_zero_is_not_dropout(models, rng):
    with pytest.raises(mcu.NoDropoutError, match="rate 0"):
        mcu.sample(models.mlp(p=0.0), models.vector(rng, 3), 4, seed=0)


def test_augmentation_layers_stay_in_inference_mode(models, rng):
    """The model ends in Dropout(0.5): every sample entry is 0 or the inference output / 0.5. Augmentation on
    would change the nonzero entries (flipped or rotated images)."""
    model = models.augmented()
    x = models.image(rng, 4)
    samples = mcu.sample(model, x, 6, seed=0)
    expected = np.broadcast_to(models.deterministic(model, x) / 0.5, samples.shape)
    kept = samples != 0
    assert kept.any() and (~kept).any()
    np.testing.assert_allclose(samples[kept], expected[kept], rtol=1e-5, atol=1e-5)


def _z_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return (a.mean(0) - b.mean(0)) / se


@pytest.mark.parametrize("strategy", ("vectorized", "prefix", "parallel", "auto"))
@pytest.mark.parametrize("model_name,shape", [("mlp", "vector"), ("cnn", "image")])
def test_every_strategy_samples_the_loop_distribution(models, rng, model_name, shape, strategy):
    """Means per output agree within Monte Carlo error, and the spread agrees; a p=0.5 vs p=0.2 control fails."""
    model = getattr(models, model_name)()
    x = getattr(models, shape)(rng, 4)
    t = 300
    loop = mcu.sample(model, x, t, strategy="loop", seed=11).reshape(t, -1).astype(np.float64)
    vec = mcu.sample(model, x, t, strategy=strategy, seed=22, chunk_size=64).reshape(t, -1).astype(np.float64)
    # 40 outputs: under the null max|z| > 4.5 has probability ~ 40 * 6.8e-6 = 3e-4 (fixed seeds: deterministic).
    assert np.abs(_z_scores(loop, vec)).max() < 4.5
    ratio = vec.var(0).mean() / loop.var(0).mean()
    assert 0.8 < ratio < 1.25  # pooled over 40 outputs, T=300: sampling error of the ratio is a few percent


def test_distribution_check_has_power(models, rng):
    """Negative control for the test above: a different dropout rate is detected."""
    x = models.vector(rng, 4)
    a = mcu.sample(models.mlp(0.5), x, 300, strategy="loop", seed=11).reshape(300, -1)
    model = models.mlp(0.5)
    b_model = models.mlp(0.2)
    if models.name == "torch":
        b_model.load_state_dict(model.state_dict())
    else:
        b_model.set_weights(model.get_weights())
    a = mcu.sample(model, x, 300, strategy="loop", seed=11).reshape(300, -1).astype(np.float64)
    b = mcu.sample(b_model, x, 300, strategy="vectorized", seed=22).reshape(300, -1).astype(np.float64)
    ratio = b.var(0).mean() / a.var(0).mean()
    assert ratio < 0.5  # p=0.2 has a quarter of the variance of p=0.5 (variance ~ p/(1-p))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seed_reproduces_and_differs_between_seeds(models, rng, strategy):
    model, x = models.mlp(), models.vector(rng, 3)
    a = mcu.sample(model, x, 7, strategy=strategy, seed=5)
    b = mcu.sample(model, x, 7, strategy=strategy, seed=5)
    c = mcu.sample(model, x, 7, strategy=strategy, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_unseeded_calls_differ(models, rng):
    model, x = models.mlp(), models.vector(rng, 3)
    assert not np.allclose(mcu.sample(model, x, 3), mcu.sample(model, x, 3))


def test_framework_tensor_input(models, rng):
    model, x = models.mlp(), models.vector(rng, 3)
    np.testing.assert_array_equal(mcu.sample(model, models.tensor(x), 4, seed=3), mcu.sample(model, x, 4, seed=3))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_model_restored_after_exception_mid_sampling(models, rng, monkeypatch, strategy):
    model = models.cnn()
    impl = get_backend(models.name)
    before = models.snapshot(model)
    calls = {"n": 0}
    original = impl.to_numpy

    def failing_to_numpy(t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("stop in the middle")
        return original(t)

    monkeypatch.setattr(impl, "to_numpy", failing_to_numpy)
    with pytest.raises(KeyboardInterrupt):
        mcu.sample(model, models.image(rng, 2), 10, strategy=strategy, chunk_size=2, seed=0)
    assert calls["n"] >= 3  # parallel workers may finish blocks already running
    assert models.same(before, models.snapshot(model))


def test_training_mode_uses_batch_statistics_and_restores_them(models, rng):
    model = models.cnn()
    before = models.snapshot(model)
    x = models.image(rng, 6)
    train = mcu.sample(model, x, 4, mode="training", seed=0)
    drop = mcu.sample(model, x, 4, mode="dropout", seed=0)
    assert train.shape == drop.shape == (4, 6, 10)
    assert not np.allclose(train.mean(0), drop.mean(0), atol=1e-3)  # batch statistics differ from running ones
    assert models.same(before, models.snapshot(model))


def test_training_mode_refuses_vectorized(models, rng):
    with pytest.raises(mcu.InputError, match="strategy"):
        mcu.sample(models.cnn(), models.image(rng, 2), 4, mode="training", strategy="vectorized")


def test_return_info_explains_the_choice(models, rng):
    _, info = mcu.sample(models.mlp(), models.vector(rng, 2), 4, return_info=True)
    assert info.backend == models.name
    assert info.strategy in STRATEGIES and info.strategy_reason
    assert "detected" in info.backend_reason


def test_chunk_size_smaller_than_batch(models, rng):
    model, x = models.mlp(), models.vector(rng, 10)
    for strategy in STRATEGIES:
        out = mcu.sample(model, x, 3, strategy=strategy, chunk_size=4, seed=0)
        assert out.shape == (3, 10, 10)


# ---- errors --------------------------------------------------------------------------------------------------


def test_model_without_dropout_raises(models, rng):
    with pytest.raises(mcu.NoDropoutError, match="Dropout") as info:
        mcu.sample(models.no_dropout(), models.vector(rng, 2), 3)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10", None])
def test_bad_n_samples(models, rng, bad):
    with pytest.raises(ValueError, match="n_samples"):
        mcu.sample(models.mlp(), models.vector(rng, 2), bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input(models, rng, value):
    x = models.vector(rng, 2)
    x[1, 3] = value
    with pytest.raises(ValueError, match="x: .*NaN or infinite"):
        mcu.sample(models.mlp(), x, 2)


@pytest.mark.parametrize("argument,value", [("strategy", "fastest"), ("precision", "fp8"), ("mode", "eval"),
                                            ("chunk_size", 0), ("seed", -3)])
def test_unknown_option_values(models, rng, argument, value):
    with pytest.raises(ValueError, match=argument):
        mcu.sample(models.mlp(), models.vector(rng, 2), 2, **{argument: value})


def test_input_the_model_rejects(models, rng):
    model = models.mlp()
    before = models.snapshot(model)
    with pytest.raises(ValueError, match=r"x: the model rejected inputs of per-example shape \(13,\)"):
        mcu.sample(model, rng.standard_normal((2, 13)).astype(np.float32), 2)
    assert models.same(before, models.snapshot(model))


def test_empty_batch(models):
    with pytest.raises(ValueError, match="x: expected a batch with at least one example"):
        mcu.sample(models.mlp(), np.zeros((0, 784), np.float32), 2)


def test_wrong_input_type(models):
    with pytest.raises(ValueError, match="x: expected a numpy array"):
        mcu.sample(models.mlp(), [[0.0] * 784], 2)


def test_unknown_backend_name(models, rng):
    with pytest.raises(mcu.BackendError, match="backend: unknown backend 'jax'"):
        mcu.sample(models.mlp(), models.vector(rng, 1), 2, backend="jax")


def test_configured_backend_that_does_not_fit_the_model(models, rng):
    other = "tensorflow" if models.name == "torch" else "torch"
    from tests.conftest import require_backend

    require_backend(other)
    with pytest.raises(mcu.BackendMismatchError, match=f"'{other}' was selected .*belongs to backend '{models.name}'"):
        mcu.sample(models.mlp(), models.vector(rng, 1), 2, backend=other)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_weight_bytes_counts_what_the_model_holds(models, model_name):
    """``auto``'s default memory budget adds the model's weights (BatchNorm statistics included)."""
    model = getattr(models, model_name)()
    expected = sum(a.nbytes for a in models.weights(model))
    assert expected > 100_000
    assert get_backend(models.name).weight_bytes(model) == expected
    assert get_backend(models.name).free_bytes(model) > 0  # a CPU: the host's available memory


def test_dropout_layers_are_all_found(models):
    impl = get_backend(models.name)
    model = models.cnn()
    assert len(impl.dropout_layers(model)) == models.dropout_count(model) == 3
