"""Numerical impact of lower precision and the sample-count convergence curve (pure numpy).

A difference is only meaningful against Monte Carlo noise: with ``T`` samples the mean probability of each
class has a standard error ``s / sqrt(T)``. So a bf16-vs-fp32 change is reported as ``|diff| / SE`` and set
beside the same number for fp32-vs-fp32 with a different seed (pure MC noise: about 0.67 median for
independent draws). Classification outputs are logits (softmax taken here); regression outputs are values.
"""

from __future__ import annotations

import numpy as np

__all__ = ["compare", "convergence_metrics", "predictive", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predictive(samples: np.ndarray, task: str) -> np.ndarray:
    """Per-sample predictions: probabilities ``(T, N, C)`` for classification, values for regression."""
    return softmax(samples.astype(np.float64)) if task == "classification" else samples.astype(np.float64)


def _uncertainty(values: np.ndarray, task: str) -> np.ndarray:
    """Per example: entropy of the mean probabilities (nats), or the predictive std for regression."""
    if task == "classification":
        p = values.mean(axis=0)
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)
    return values.std(axis=0, ddof=1).reshape(values.shape[1], -1).mean(axis=-1)


def compare(reference: np.ndarray, other: np.ndarray, task: str) -> dict[str, float]:
    """How far ``other``'s summaries are from ``reference``'s, in units of the Monte Carlo standard error.

    Args:
        reference, other: samples ``(T, N, *out)`` of the same model and inputs.

    Returns:
        ``mean_z_median`` / ``mean_z_max``: ``|mean_a - mean_b| / sqrt((var_a + var_b) / T)`` over all outputs;
        ``mean_abs_max``: the largest absolute change of a mean prediction;
        ``uncertainty_abs_mean``: mean absolute change of the entropy (std for regression) per example;
        ``argmax_agreement``: share of examples whose predicted class is unchanged (classification).
    """
    a, b = predictive(reference, task), predictive(other, task)
    t = a.shape[0]
    se = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / t)
    diff = np.abs(a.mean(axis=0) - b.mean(axis=0))
    z = diff / np.maximum(se, 1e-12)
    out = {
        "mean_z_median": float(np.median(z)),
        "mean_z_max": float(z.max()),
        "mean_abs_max": float(diff.max()),
        "uncertainty_abs_mean": float(np.abs(_uncertainty(a, task) - _uncertainty(b, task)).mean()),
    }
    if task == "classification":
        out["argmax_agreement"] = float((a.mean(axis=0).argmax(-1) == b.mean(axis=0).argmax(-1)).mean())
    return out


def convergence_metrics(samples: np.ndarray, task: str) -> dict[str, float]:
    """The article's convergence test: ``samples.std(axis=0).mean()`` (on probabilities for classification),
    plus the mean predictive entropy for classification."""
    values = predictive(samples, task)
    out = {"mean_std": float(values.std(axis=0, ddof=1).mean())}
    if task == "classification":
        out["entropy"] = float(_uncertainty(values, task).mean())
    return out
