"""mcu.predict: streaming equals dense, auto sample counts, batches, regression intervals, errors."""

from __future__ import annotations

import numpy as np
import pytest

import mcu
from mcu import metrics
from mcu.core.predict import batch_seeds
from tests.conftest import require_module


@pytest.mark.parametrize("batch_size", [None, 3])
def test_streaming_prediction_equals_dense_metrics(models, rng, batch_size):
    model, x = models.mlp(), models.vector(rng, 7)
    pred = mcu.predict(model, x, 37, seed=4, strategy="loop", batch_size=batch_size)
    n = len(x)
    bs = batch_size or n
    seeds = batch_seeds(4, -(-n // bs))
    dense = np.concatenate(
        [mcu.sample(model, x[i : i + bs], 37, seed=s, strategy="loop") for i, s in zip(range(0, n, bs), seeds)], axis=1
    )
    summary = metrics.classification_summary(dense, from_logits=True)
    for name in ("mean_probabilities", "predictive_entropy", "expected_entropy", "mutual_information",
                 "variation_ratio", "margin", "max_probability", "predictive_variance"):
        np.testing.assert_allclose(getattr(pred, name), summary[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(pred.label, summary["mean_probabilities"].argmax(-1))
    assert (pred.n_samples == 37).all()


def test_predict_is_reproducible_with_a_seed(models, rng):
    model, x = models.mlp(), models.vector(rng, 5)
    a = mcu.predict(model, x, 20, seed=1)
    b = mcu.predict(model, x, 20, seed=1)
    np.testing.assert_array_equal(a.mutual_information, b.mutual_information)


def test_auto_sample_count_meets_the_tolerance(models, rng):
    model, x = models.mlp(), models.vector(rng, 6)
    loose = mcu.predict(model, x, "auto", tol=0.05, max_samples=400, seed=0)
    tight = mcu.predict(model, x, "auto", tol=0.005, max_samples=400, seed=0)
    assert (loose.standard_error < 0.05).all()
    assert tight.n_samples.max() > loose.n_samples.max()
    assert (tight.standard_error < 0.005).all() or tight.n_samples.max() == 400


def test_regression_prediction_and_interval():
    torch = require_module("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    x = np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)
    pred = mcu.predict(model, x, 40, task="regression", seed=0, strategy="loop", noise_var=0.25)
    dense = mcu.sample(model, x, 40, seed=batch_seeds(0, 1)[0], strategy="loop")
    np.testing.assert_allclose(pred.mean, dense.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pred.std, np.sqrt(dense.var(0) + 0.25), rtol=1e-6)
    low, high = pred.interval(0.9)
    np.testing.assert_allclose(high - pred.mean, 1.6448536 * pred.std, rtol=1e-6)
    assert "mean" in pred.table() and "regression" in repr(pred)


def test_prediction_inspection(models, rng):
    pred = mcu.predict(models.mlp(), models.vector(rng, 12), 5, seed=0)
    d = pred.to_dict()
    assert set(d) >= {"mean_probabilities", "label", "mutual_information", "n_samples"}
    text = pred.table(max_rows=3)
    assert "mutual_information" in text and "... 9 more" in text
    assert repr(pred).startswith("Prediction(task='classification', N=12, T=5..5")


@pytest.mark.parametrize("kwargs,match", [
    ({"task": "segmentation"}, "task"),
    ({"n_samples": "auto"}, "tol"),
    ({"n_samples": "auto", "tol": -1}, "tol"),
    ({"n_samples": 0}, "n_samples"),
    ({"score": "variance"}, "score"),
    ({"batch_size": 0}, "batch_size"),
])
def test_predict_errors(models, rng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mcu.predict(models.mlp(), models.vector(rng, 2), **kwargs)


def test_interval_on_classification_is_refused(models, rng):
    with pytest.raises(ValueError, match="interval"):
        mcu.predict(models.mlp(), models.vector(rng, 2), 3).interval(0.9)


def test_tol_without_auto_sample_count_is_refused(models, rng):
    with pytest.raises(ValueError, match="tol: only used with n_samples='auto'"):
        mcu.predict(models.mlp(), models.vector(rng, 2), 10, tol=1e-3)
