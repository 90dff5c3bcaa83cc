"""The article's sample-count convergence test (T = 10, 20, 50, 100, 200), with error bars, on digits.

The article draws fresh samples for each T and plots the mean standard deviation of the outputs. mcu draws
the largest T once and evaluates the statistic on the first t samples for each t, with a bootstrap Monte
Carlo standard error (``mcu.metrics.convergence_curve``); ``smallest_sufficient_t`` reads off the smallest
T whose standard error is below a tolerance. As a check of the error bars, the article's way is also run:
independent runs at each T, whose spread should match the bootstrap standard error.

Run: python examples/convergence_test.py [--backend torch|tensorflow] [--out DIR] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import mcu
from mcu.demo import data, models
from mcu.demo.report import plot_convergence
from mcu.metrics import DEFAULT_TS, convergence_curve, mutual_information, smallest_sufficient_t

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STATISTICS = {
    "mean std of the logits (the article)": lambda s: s.std(axis=0).mean(),
    "mean mutual information (nats)": lambda s: mutual_information(s, from_logits=True).mean(),
}


def run(backend: str = "torch", seed: int = 0, ts=DEFAULT_TS, repeats: int = 5, n_examples: int = 300,
        epochs: int = 40, rel_tol: float = 0.01) -> dict:
    """Train the digits classifier; convergence curves of each statistic, and ``repeats`` independent runs
    per T. ``rel_tol``: the tolerance of ``smallest_sufficient_t``, relative to the estimate at the largest T."""
    split = data.digits_splits(seed, held_out=())
    model = models.train_classifier(backend, split.x_train, split.y_train, 10, seed=seed, epochs=epochs)
    x = split.x_test[:n_examples]
    ts = tuple(ts)
    samples = mcu.sample(model, x, max(ts), seed=seed)  # (T, N, 10) logits, drawn once
    curves = {name: convergence_curve(samples, ts, statistic=f, n_bootstrap=200, seed=seed)
              for name, f in STATISTICS.items()}
    # the article's way: fresh samples for every T (here `repeats` times, to see their spread)
    runs = {name: np.empty((repeats, len(ts))) for name in STATISTICS}
    for r in range(repeats):
        for j, t in enumerate(ts):
            fresh = mcu.sample(model, x, t, seed=seed + 1000 + r * len(ts) + j)
            for name, f in STATISTICS.items():
                runs[name][r, j] = f(fresh)
    sufficient = {name: smallest_sufficient_t(c, rel_tol * abs(float(c.estimates[-1]))) for name, c in curves.items()}
    return {"curves": curves, "runs": runs, "sufficient_t": sufficient, "rel_tol": rel_tol, "n_examples": len(x)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "tensorflow"])
    parser.add_argument("--out", default=".", type=Path)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--repeats", default=5, type=int)
    parser.add_argument("--quick", action="store_true", help="T up to 100, 2 repeats, 100 examples")
    args = parser.parse_args(argv)
    quick = {"ts": (10, 20, 50, 100), "repeats": 2, "n_examples": 100, "epochs": 20}
    options = quick if args.quick else {"repeats": args.repeats}
    with models.single_thread(args.backend):
        result = run(args.backend, args.seed, **options)
    for name, curve in result["curves"].items():
        print(name)
        print("     T  first-T estimate  bootstrap SE  independent runs: mean, sd")
        runs = result["runs"][name]
        for j, t in enumerate(curve.ts):
            print(f"  {t:4d}  {curve.estimates[j]:16.4f}  {curve.standard_errors[j]:12.4f}  "
                  f"{runs[:, j].mean():10.4f}, {runs[:, j].std(ddof=1):.4f}")
        t = result["sufficient_t"][name]
        enough = t if t else f"more than {curve.ts[-1]}"
        print(f"  SE below {result['rel_tol']:.0%} of the estimate from T = {enough}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = plot_convergence(result["curves"], args.out / "convergence_test.png", repeats=result["runs"],
                            title=f"Convergence test over T on {result['n_examples']} digits ({args.backend})")
    print("plot:", path)


if __name__ == "__main__":
    main()
