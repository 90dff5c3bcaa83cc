"""The demo's steps: each trains or samples with mcu and returns plain results (numbers, arrays, reports).

Plots and the report are drawn from these results by :mod:`mcu.demo.report`; :func:`run` chains the steps
behind a progress bar. :func:`diabetes_intervals` is also the body of ``examples/diabetes_intervals.py``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import mcu
from mcu.active import query
from mcu.core.progress import progress_bar
from mcu.demo import data, models
from mcu.metrics import (
    ConformalIntervalCalibrator,
    aupr,
    auroc,
    convergence_curve,
    expected_calibration_error,
    interval_coverage,
    mean_interval_width,
    mutual_information,
    reliability_diagram,
    smallest_sufficient_t,
)
from mcu.triage import Triage, fit_thresholds

__all__ = ["DemoConfig", "diabetes_intervals", "run"]

#: The reference guide's review threshold on the predictive entropy.
ARTICLE_REVIEW_THRESHOLD = 0.15


@dataclass
class DemoConfig:
    """Settings of one demo run; :meth:`quick` gives the smaller run used by the tests."""

    backend: str
    seed: int = 0
    n_samples: int = 100
    epochs: int = 40
    held_out: tuple[int, ...] = data.DEFAULT_HELD_OUT
    al_initial_per_class: int = 3
    al_query_size: int = 30
    diabetes_epochs: int = 300
    convergence_ts: tuple[int, ...] = (10, 20, 50, 100, 200)
    convergence_examples: int = 300
    progress: bool | None = None  # None: MCU_PROGRESS, else only on a terminal

    @classmethod
    def quick(cls, backend: str, **overrides: Any) -> "DemoConfig":
        settings = dict(n_samples=50, epochs=25, diabetes_epochs=100, convergence_ts=(10, 20, 50, 100),
                        convergence_examples=100)
        return cls(backend, **{**settings, **overrides})


# -- classification on digits ---------------------------------------------------------------------------------


def train_digits(cfg: DemoConfig) -> tuple[data.DigitsSplits, Any]:
    """The small dropout classifier, trained on the seen digit classes."""
    splits = data.digits_splits(cfg.seed, cfg.held_out)
    model = models.train_classifier(cfg.backend, splits.x_train, splits.y_train, splits.n_classes, seed=cfg.seed,
                                    epochs=cfg.epochs)
    return splits, model


def predict_digits(cfg: DemoConfig, splits: data.DigitsSplits, model: Any) -> dict[str, Any]:
    """MC-dropout predictions (``mcu.predict``) on validation, test and unseen-class digits."""
    out = {}
    for i, name in enumerate(("val", "test", "ood")):
        x = getattr(splits, f"x_{name}")
        out[name] = mcu.predict(model, x, cfg.n_samples, seed=cfg.seed + i, progress=cfg.progress)
    out["deterministic_probs"] = _softmax(models.logits(model, splits.x_test))
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def confidence_examples(splits: data.DigitsSplits, preds: dict[str, Any], n_seen: int = 6,
                        n_unseen: int = 3) -> list[dict[str, Any]]:
    """A few digits with their confidence index: the first seen test digits, the least certain seen one,
    and some unseen-class digits. Digits are the original 0-9 names."""
    test, ood = preds["test"], preds["ood"]
    picks = [("test", i) for i in range(n_seen - 1)]
    picks.append(("test", int(np.argmax(test.mutual_information))))
    picks += [("ood", i) for i in range(n_unseen)]
    rows = []
    for source, i in picks:
        p = test if source == "test" else ood
        truth = splits.classes[splits.y_test[i]] if source == "test" else int(splits.y_ood[i])
        rows.append({
            "source": "seen" if source == "test" else "unseen class", "index": i, "truth": int(truth),
            "predicted": int(splits.classes[p.label[i]]), "max_probability": float(p.max_probability[i]),
            "mutual_information": float(p.mutual_information[i]),
            "predictive_entropy": float(p.predictive_entropy[i]),
            "image": (splits.x_test if source == "test" else splits.x_ood)[i].reshape(8, 8),
        })
    return rows


def decomposition(splits: data.DigitsSplits, preds: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean total / aleatoric / epistemic uncertainty for correct, wrong and unseen-class inputs."""
    test, ood = preds["test"], preds["ood"]
    correct = test.label == splits.y_test
    groups = {"correct": (test, correct), "wrong": (test, ~correct), "unseen class": (ood, np.ones(len(ood), bool))}
    out = {}
    for name, (p, mask) in groups.items():
        pick = (lambda a: float(a[mask].mean())) if mask.any() else (lambda a: float("nan"))
        out[name] = {"n": int(mask.sum()), "total": pick(p.predictive_entropy), "aleatoric": pick(p.expected_entropy),
                     "epistemic": pick(p.mutual_information)}
    return out


def calibration(splits: data.DigitsSplits, preds: dict[str, Any]) -> dict[str, Any]:
    """Reliability diagram and ECE of the MC-dropout mean, compared with one deterministic pass."""
    test = preds["test"]
    return {
        "diagram": reliability_diagram(test.mean, splits.y_test, n_bins=10),
        "ece_deterministic": expected_calibration_error(preds["deterministic_probs"], splits.y_test, n_bins=10),
        "accuracy": float(np.mean(test.label == splits.y_test)),
        "accuracy_deterministic": float(np.mean(preds["deterministic_probs"].argmax(1) == splits.y_test)),
    }


def unseen_separation(preds: dict[str, Any]) -> dict[str, float]:
    """How well uncertainty tells unseen-class digits (positives) from seen test digits: AUROC, AUPR."""
    test, ood = preds["test"], preds["ood"]
    return {
        "auroc_mi": auroc(ood.mutual_information, test.mutual_information),
        "auroc_entropy": auroc(ood.predictive_entropy, test.predictive_entropy),
        "aupr_mi": aupr(ood.mutual_information, test.mutual_information),
        "chance_aupr": len(ood) / (len(ood) + len(test)),
    }


def triage(splits: data.DigitsSplits, preds: dict[str, Any], *, review_rate: float = 0.05,
           auto_accuracy: float = 1.0) -> dict[str, Any]:
    """Tiers on the predictive entropy: thresholds fitted on validation, reported on the seen test digits and
    on a production mix of seen and unseen-class digits (an unseen-class answer is always wrong); the
    article's fixed review threshold 0.15 for comparison."""
    val, test, ood = preds["val"], preds["test"], preds["ood"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = fit_thresholds(val.predictive_entropy, val.label == splits.y_val, target_review_rate=review_rate,
                                target_auto_accuracy=auto_accuracy)
    correct = test.label == splits.y_test
    mix_u = np.concatenate([test.predictive_entropy, ood.predictive_entropy])
    mix_ok = np.concatenate([correct, np.zeros(len(ood), bool)])
    article = Triage((ARTICLE_REVIEW_THRESHOLD,), ("auto", "review"))
    return {
        "triage": fitted, "targets": {"review_rate": review_rate, "auto_accuracy": auto_accuracy},
        "notes": [str(w.message) for w in caught],
        "report": fitted.report(test.predictive_entropy, correct),
        "mix_report": fitted.report(mix_u, mix_ok),
        "article_report": article.report(test.predictive_entropy, correct),
        "unseen_tiers": {t: float(np.mean(fitted.route(ood.predictive_entropy) == t)) for t in fitted.tiers},
        "unseen_review_article": float(np.mean(article.route(ood.predictive_entropy) == "review")),
    }


def active_round(cfg: DemoConfig, splits: data.DigitsSplits) -> dict[str, Any]:
    """One active-learning round: a model trained on a few labels queries ``k`` more with BALD (and, for
    comparison, ``k`` at random), is retrained, and is tested before and after."""
    start = data.initial_indices(splits.y_train, cfg.al_initial_per_class, cfg.seed)
    unlabeled = np.setdiff1d(np.arange(len(splits.y_train)), start)

    def fit(indices: np.ndarray) -> Any:
        return models.train_classifier(cfg.backend, splits.x_train[indices], splits.y_train[indices],
                                       splits.n_classes, seed=cfg.seed, epochs=1, min_steps=300)

    before = fit(start)
    out: dict[str, Any] = {"n_initial": len(start), "k": cfg.al_query_size,
                           "accuracy_before": models.accuracy(before, splits.x_test, splits.y_test)}
    for heuristic in ("bald", "random"):
        chosen, scores = query(before, splits.x_train, cfg.al_query_size, heuristic=heuristic, n_samples=30,
                               seed=cfg.seed, subset=unlabeled, progress=cfg.progress)
        after = fit(np.concatenate([start, chosen]))
        out[heuristic] = {"indices": chosen, "scores": scores,
                          "accuracy_after": models.accuracy(after, splits.x_test, splits.y_test),
                          "classes": [splits.classes[c] for c in splits.y_train[chosen]]}
    out["images"] = splits.x_train[out["bald"]["indices"]].reshape(-1, 8, 8)
    return out


def convergence(cfg: DemoConfig, splits: data.DigitsSplits, model: Any) -> dict[str, Any]:
    """The article's sample-count test: mean std of the outputs and mean mutual information on the first t
    of T samples, t in ``cfg.convergence_ts``, with bootstrap standard errors."""
    x = splits.x_test[: cfg.convergence_examples]
    samples = mcu.sample(model, x, max(cfg.convergence_ts), seed=cfg.seed)  # (T, N, C) logits
    curves = {
        "mean std of the logits (the article's statistic)": convergence_curve(
            samples, cfg.convergence_ts, statistic=lambda s: s.std(axis=0).mean(), n_bootstrap=100, seed=cfg.seed),
        "mean mutual information (nats)": convergence_curve(
            samples, cfg.convergence_ts, statistic=lambda s: mutual_information(s, from_logits=True).mean(),
            n_bootstrap=100, seed=cfg.seed),
    }
    # "enough samples": Monte Carlo standard error below 2% of the estimate at the largest T
    sufficient = {name: smallest_sufficient_t(c, 0.02 * float(c.estimates[-1])) for name, c in curves.items()}
    return {"curves": curves, "sufficient_t": sufficient, "n_examples": len(x)}


# -- regression intervals on diabetes -------------------------------------------------------------------------


def diabetes_intervals(backend: str = "torch", seed: int = 0, n_samples: int = 100, epochs: int = 300) -> dict:
    """MC-dropout 95% intervals on diabetes, before and after split-conformal recalibration.

    Trains the dropout regressor on 60% of the data, fits the conformal scale on 20% (calibration) and
    measures coverage and width on the other 20% (test).

    Returns:
        ``model``, ``test`` (the :class:`mcu.Prediction`), ``y_test``, ``interval`` (recalibrated
        ``(low, high)``), ``scale``, ``raw_coverage``, ``raw_width``, ``coverage``, ``width``.
    """
    (x_tr, y_tr), (x_cal, y_cal), (x_te, y_te) = data.diabetes_splits(seed)
    model = models.train_regressor(backend, x_tr, y_tr, seed, epochs)
    cal = mcu.predict(model, x_cal, n_samples, task="regression", seed=seed)
    test = mcu.predict(model, x_te, n_samples, task="regression", seed=seed + 1)
    raw_low, raw_high = test.interval(0.95)
    calibrator = ConformalIntervalCalibrator(level=0.95).fit(cal.mean[:, 0], cal.std[:, 0], y_cal)
    low, high = calibrator.interval(test.mean[:, 0], test.std[:, 0])
    return {
        "model": model, "test": test, "y_test": y_te, "interval": (low, high), "scale": calibrator.scale_,
        "raw_coverage": interval_coverage(y_te, raw_low[:, 0], raw_high[:, 0]),
        "raw_width": mean_interval_width(raw_low[:, 0], raw_high[:, 0]),
        "coverage": interval_coverage(y_te, low, high),
        "width": mean_interval_width(low, high),
    }


# -- everything -----------------------------------------------------------------------------------------------


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Every step in order, behind a progress bar; the results keyed by step, plus ``seconds`` per step."""
    results: dict[str, Any] = {"config": cfg, "seconds": {}}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        value = fn()
        results["seconds"][name] = time.perf_counter() - start
        bar.update()
        return value

    with progress_bar(cfg.progress, total=8, desc="mcu demo", unit="step") as bar:
        splits, model = step("train classifier", lambda: train_digits(cfg))
        results.update(splits=splits, model=model)
        preds = step("MC-dropout predictions", lambda: predict_digits(cfg, splits, model))
        results["predictions"] = preds
        results["examples"] = confidence_examples(splits, preds)
        results["decomposition"] = decomposition(splits, preds)
        results["calibration"] = step("calibration", lambda: calibration(splits, preds))
        results["unseen"] = step("unseen classes", lambda: unseen_separation(preds))
        results["triage"] = step("triage", lambda: triage(splits, preds))
        results["active"] = step("active learning", lambda: active_round(cfg, splits))
        results["diabetes"] = step("diabetes intervals", lambda: diabetes_intervals(
            cfg.backend, cfg.seed, cfg.n_samples, cfg.diabetes_epochs))
        results["convergence"] = step("convergence", lambda: convergence(cfg, splits, model))
    return results
