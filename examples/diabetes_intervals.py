"""Regression intervals on scikit-learn's bundled diabetes data, recalibrated by split conformal.

MC dropout alone gives *epistemic* spread: intervals built from it under-cover badly on noisy targets. Split
conformal recalibration on a held-out split rescales them so that a separate test split is covered at the
nominal level. Also draws the article's confidence-band plot (mean ± 2 std, sorted by prediction).

The steps live in :func:`mcu.demo.pipeline.diabetes_intervals` (shared with ``mcu demo``): train a dropout
regressor, ``mcu.predict(..., task="regression")`` on a calibration and a test split, then
``ConformalIntervalCalibrator(level=0.95).fit(cal.mean, cal.std, y_cal).interval(test.mean, test.std)``.

Run: python examples/diabetes_intervals.py [--backend torch|tensorflow] [--out DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mcu.demo.data import diabetes_splits as load  # noqa: F401  (re-exported: the data splits)
from mcu.demo.models import single_thread
from mcu.demo.pipeline import diabetes_intervals as run
from mcu.demo.report import plot_confidence_band

__all__ = ["load", "plot_confidence_band", "run"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "tensorflow"])
    parser.add_argument("--out", default=".", type=Path)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--epochs", default=300, type=int)
    args = parser.parse_args(argv)
    with single_thread(args.backend):
        result = run(args.backend, seed=args.seed, epochs=args.epochs)
    print(f"raw MC-dropout 95% intervals: coverage {result['raw_coverage']:.1%}, mean width {result['raw_width']:.3f}")
    print(f"split-conformal 95% intervals: coverage {result['coverage']:.1%}, mean width {result['width']:.3f} "
          f"(scale {result['scale']:.2f})")
    args.out.mkdir(parents=True, exist_ok=True)
    print("plot:", plot_confidence_band(result, args.out / "diabetes_confidence_band.png"))


if __name__ == "__main__":
    main()
