"""``mcu demo``: train a small dropout classifier on bundled digits and report its uncertainty.

Usage::

    mcu demo [--backend torch|tensorflow] [--out DIR] [--quick] [--seed N] [--samples T]

Trains a 64-128-128-8 MLP with dropout on scikit-learn's digits (the digits 5 and 9 held out as classes the
model never sees), then (with progress bars on a terminal, or as ``MCU_PROGRESS`` says): predictions with a
confidence index, the uncertainty decomposition, a reliability diagram, the separation of unseen classes,
triage tiers, one active-learning round, regression intervals on diabetes and the convergence of the
uncertainty with the number of samples.
It prints a summary and writes PNG plots, ``report.md`` and ``report.html`` to ``DIR`` (default ``./mcu-demo``).

The default backend is the configured one (``MCU_BACKEND``, ``[tool.mcu]``; see :mod:`mcu.config`), else the
first of torch, tensorflow that can run (the Keras backend also on JAX or PyTorch, without TensorFlow).
Nothing here imports a framework before the backend is chosen.

Modules: :mod:`~mcu.demo.data` (digits and diabetes splits, corruptions), :mod:`~mcu.demo.models` (the
dropout networks for both frameworks), :mod:`~mcu.demo.pipeline` (the steps), :mod:`~mcu.demo.report`
(plots and report).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcu demo", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "tensorflow"], default=None,
                        help="framework to run (default: the configured backend, else the first installed)")
    parser.add_argument("--out", type=Path, default=Path("mcu-demo"), help="directory for the plots and report.md")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (fewer samples and epochs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--samples", type=int, default=None, help="MC-dropout samples per input (default 100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported

    from mcu.demo import models, pipeline, report

    backend = args.backend or models.default_backend()
    options = {"seed": args.seed, "progress": False if args.no_progress else None}
    if args.samples is not None:
        options["n_samples"] = args.samples
    cfg = pipeline.DemoConfig.quick(backend, **options) if args.quick else pipeline.DemoConfig(backend, **options)
    start = time.perf_counter()
    print(f"mcu demo: backend {backend}, T={cfg.n_samples} samples, seed {cfg.seed}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    with models.single_thread(backend):
        results = pipeline.run(cfg)
    sections, files = report.write_report(results, args.out)
    print(report.render_text(sections))
    print(f"\nDone in {time.perf_counter() - start:.0f} s. Report: {files['markdown']} (and {files['html'].name}); "
          f"plots in {args.out}/:")
    for key, path in files.items():
        if path.suffix == ".png":
            print(f"  {path.name}")
    return 0
