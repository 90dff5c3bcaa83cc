"""Throughput of :func:`mcu.distributed.predict` with 1..k workers against single-process :func:`mcu.predict`.

Run ``python -m benchmarks.ray_throughput`` (options: ``--help``). It starts a local Ray instance with all the
machine's CPUs (or connects to ``--address``), then, interleaving the configurations for ``--repeats`` rounds,
times:

* ``mcu.predict`` in this process with torch limited to 1 thread and to all cores (the baselines), first
  before Ray starts, then again while Ray runs (its daemons take some CPU: multi-threaded torch, whose threads
  wait for each other, suffers most on a small machine);
* ``mcu.distributed.predict`` with ``w`` workers of ``--cpus-per-worker`` CPUs, end to end (actor start-up,
  model loading, scoring, Parquet writing), for each ``w`` in ``--workers``.

It prints medians (examples per second) and the speed-up over the 1-thread baseline without Ray, with the
machine and versions. Numbers on a shared machine are noisy: other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np


def build_model() -> Any:
    """The reference article's MC-dropout MLP (784 -> 512 -> 10), fixed weights. Importable by workers."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 10))


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="pool size (default 20000)")
    parser.add_argument("--samples", type=int, default=50, help="MC samples per example (default 50)")
    parser.add_argument("--batch-size", type=int, default=500, help="examples per batch (default 500)")
    parser.add_argument("--strategy", default="vectorized", help="sampling strategy (default vectorized)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--address", default=None, help="Ray address to connect to (default: start a local one)")
    args = parser.parse_args(argv)

    import ray
    import torch

    import mcu
    import mcu.distributed

    cpus = os.cpu_count() or 1
    x = np.random.default_rng(0).standard_normal((args.n, 784)).astype(np.float32)
    model = build_model()
    common = dict(seed=0, batch_size=args.batch_size, strategy=args.strategy)
    out = tempfile.mkdtemp(prefix="mcu-throughput-")

    def local(threads: int) -> Callable[[], Any]:
        def run() -> None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                mcu.predict(model, x, args.samples, **common)
            finally:
                torch.set_num_threads(before)
        return run

    def distributed(workers: int) -> Callable[[], Any]:
        def run() -> None:
            mcu.distributed.predict("benchmarks.ray_throughput:build_model", x, args.samples,
                                    output=os.path.join(out, "scores"), overwrite=True, num_workers=workers,
                                    cpus_per_worker=args.cpus_per_worker, **common)
        return run

    baselines = {"mcu.predict, 1 thread": local(1), f"mcu.predict, {cpus} threads": local(cpus)}
    local(1)()  # warm-up: imports, the strategy's first pass
    times: dict[str, list[float]] = {}

    def rounds(configs: dict[str, Callable[[], Any]], suffix: str) -> None:
        for name in configs:
            times[name + suffix] = []
        for _ in range(args.repeats):
            for name, fn in configs.items():
                times[name + suffix].append(_time(fn))

    rounds(baselines, " (no Ray)")
    if args.address:
        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    configs = dict(baselines)
    for w in args.workers:
        configs[f"ray, {w} worker(s) x {args.cpus_per_worker:g} CPU"] = distributed(w)
    try:
        rounds(configs, "")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        ray.shutdown()

    print(f"machine: {platform.processor() or platform.machine()}, {cpus} CPUs (os.cpu_count), "
          f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
          f"mcu {mcu.__version__}")
    print(f"workload: N={args.n} x 784 -> 512 -> 10 MLP, T={args.samples}, batch {args.batch_size}, "
          f"strategy {args.strategy}; median of {args.repeats} interleaved runs, end to end")
    base = statistics.median(times["mcu.predict, 1 thread (no Ray)"])
    print(f"{'configuration':<44}{'median s':>10}{'examples/s':>12}{'vs 1 thread':>13}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<44}{median:>10.2f}{args.n / median:>12.0f}{base / median:>12.2f}x")


if __name__ == "__main__":
    main()
