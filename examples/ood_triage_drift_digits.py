"""Unseen classes, triage and drift on digits: train on some digit classes, then watch the others arrive.

1. **Unseen classes.** The classifier never sees the held-out digits (default 5 and 9). The MC-dropout mutual
   information of each input separates them from seen-class test digits (AUROC).
2. **Triage.** Thresholds on the predictive entropy, fitted on validation data (at most 5% to human
   review, an automatic tier that made no mistake on validation), reported on the test digits and on a
   production mix with the unseen-class digits (``mcu.triage``; steps shared with ``mcu demo``).
3. **Drift.** ``mcu.monitor.DriftMonitor`` keeps the validation uncertainties as its reference and tests
   windows of production uncertainties (two-sample KS test, ``alpha`` per window). The stream is
   ``n_windows`` in-distribution windows, then corrupted digits (Gaussian noise by default). Only 287 seen
   test digits exist, so the in-distribution windows are drawn from their uncertainties (each window
   without replacement, windows independently): the windows are real uncertainties of unseen-in-training
   digits, re-used across windows. The corrupted windows are drawn the same way from the corrupted test
   digits. We count false alarms among the in-distribution windows and how many windows after the shift
   the first alarm comes (0 = the first corrupted window).

Run: python examples/ood_triage_drift_digits.py [--backend torch|tensorflow] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import mcu
from mcu.demo import data, models, pipeline
from mcu.demo.report import plot_triage, plot_unseen, pyplot
from mcu.monitor import DriftMonitor

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def drift_stream(reference: np.ndarray, in_dist: np.ndarray, shifted: np.ndarray, *, window: int, n_windows: int,
                 n_shifted: int, alpha: float, seed: int) -> dict:
    """Feed ``n_windows`` in-distribution windows then ``n_shifted`` shifted ones to a DriftMonitor."""
    rng = np.random.default_rng(seed)
    draw = lambda scores: rng.choice(scores, size=window, replace=False)  # noqa: E731
    stream = np.concatenate([draw(in_dist) for _ in range(n_windows)] + [draw(shifted) for _ in range(n_shifted)])
    monitor = DriftMonitor(reference, window=window, alpha=alpha)
    monitor.update(stream)
    alarms = np.array([c.alarm for c in monitor.checks])
    after = np.flatnonzero(alarms[n_windows:])
    return {"checks": monitor.checks, "false_alarms": int(alarms[:n_windows].sum()), "n_windows": n_windows,
            "delay": int(after[0]) if after.size else None, "detected_share": float(alarms[n_windows:].mean())}


def run(backend: str = "torch", seed: int = 0, n_samples: int = 100, epochs: int = 40,
        held_out=data.DEFAULT_HELD_OUT, window: int = 50, n_windows: int = 100, n_shifted: int = 10,
        alpha: float = 0.01, corruption: str = "noise", severity: float = 0.5) -> dict:
    cfg = pipeline.DemoConfig(backend, seed=seed, n_samples=n_samples, epochs=epochs, held_out=tuple(held_out),
                              progress=False)
    splits, model = pipeline.train_digits(cfg)
    preds = pipeline.predict_digits(cfg, splits, model)  # mcu.predict on validation, test, unseen classes
    reference = preds["val"].predictive_entropy
    drift = {}
    for kind in [corruption] + [k for k in data.CORRUPTIONS if k != corruption]:  # headline first, then the others
        shifted = mcu.predict(model, data.corrupt(splits.x_test, kind, severity, seed=seed), n_samples, seed=seed + 7)
        drift[kind] = drift_stream(reference, preds["test"].predictive_entropy, shifted.predictive_entropy,
                                   window=window, n_windows=n_windows, n_shifted=n_shifted, alpha=alpha, seed=seed)
        drift[kind]["accuracy"] = float(np.mean(shifted.label == splits.y_test))
    return {
        "splits": splits, "predictions": preds, "unseen": pipeline.unseen_separation(preds),
        "triage": pipeline.triage(splits, preds), "drift": drift, "corruption": corruption,
        "severity": severity, "alpha": alpha, "window": window,
    }


def plot_drift(result: dict, path: Path) -> Path:
    """p-value of each window test, for each corruption; the shift and alpha marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    floor = 1e-30  # p-values below are drawn at the floor
    first = next(iter(result["drift"].values()))
    n = first["n_windows"]
    p_in = np.maximum([c.p_value for c in first["checks"][:n]], floor)
    ax.plot(np.arange(n), p_in, marker=".", color="gray", linewidth=0.8,
            label=f"in-distribution windows: {first['false_alarms']} false alarm(s) of {n}")
    for kind, d in result["drift"].items():
        p = np.maximum([c.p_value for c in d["checks"][n - 1:]], floor)  # joined to the last in-distribution window
        ax.plot(np.arange(n - 1, n - 1 + len(p)), p, marker=".", linewidth=0.8,
                label=f"{kind}: first alarm {d['delay']} window(s) after the shift, {d['detected_share']:.0%} alarmed")
    ax.axvline(n - 0.5, color="black", linestyle=":", label="shift to corrupted digits")
    ax.axhline(result["alpha"], color="red", linestyle="--", label=f"alpha = {result['alpha']} per window")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, 3)
    ax.set_xlabel(f"window ({result['window']} inputs each)")
    ax.set_ylabel("KS test p-value (log scale)")
    ax.set_title(f"Drift monitor on the predictive entropy (corruption severity {result['severity']})")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "tensorflow"])
    parser.add_argument("--out", default=".", type=Path)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--quick", action="store_true", help="T=30 samples, 25 epochs")
    args = parser.parse_args(argv)
    options = {"n_samples": 30, "epochs": 25} if args.quick else {}
    with models.single_thread(args.backend):
        result = run(args.backend, args.seed, **options)
    u, held = result["unseen"], result["splits"].held_out
    print(f"unseen digits {held} vs seen test digits: AUROC mutual information {u['auroc_mi']:.3f}, "
          f"predictive entropy {u['auroc_entropy']:.3f}")
    print("triage on the seen test digits:\n" + str(result["triage"]["report"]))
    print("triage on the production mix (seen + unseen-class digits):\n" + str(result["triage"]["mix_report"]))
    print(f"drift: {next(iter(result['drift'].values()))['n_windows']} in-distribution windows of {result['window']}, "
          f"then corrupted digits (severity {result['severity']}), alpha {result['alpha']} per window")
    for kind, d in result["drift"].items():
        print(f"  {kind:9} false alarms {d['false_alarms']:2d}/{d['n_windows']}; first alarm {d['delay']} windows "
              f"after the shift; {d['detected_share']:.0%} of shifted windows alarmed; accuracy {d['accuracy']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    preds = result["predictions"]
    for path in (plot_unseen(preds["test"].mutual_information, preds["ood"].mutual_information, u["auroc_mi"],
                             args.out / "ood_unseen_classes.png"),
                 plot_triage(result["triage"], args.out / "ood_triage.png"),
                 plot_drift(result, args.out / "drift_monitor.png")):
        print("plot:", path)


if __name__ == "__main__":
    main()
