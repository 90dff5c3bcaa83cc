"""BERT: time per call against copies of the batch per pass, next to the fp32 ``train()`` loop.

What the memory budget trades: ``vectorized`` with ``chunk_size = N x copies`` for each copies value, and the
reference (30 passes of ``model.train()`` under ``no_grad``), interleaved in each round; medians over rounds
and each configuration's ratio to the reference.

Run: python -m benchmarks.transformer_copies [--precision bf16] [--n 8] [--t 30] [--copies 1,2,4,8,16,30]
         [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mcu
from mcu.bench.workloads import WORKLOADS, inputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--t", type=int, default=30)
    parser.add_argument("--copies", default="1,2,4,8,16,30")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    workload = WORKLOADS["transformer"]
    model = workload.build("torch", seed=0)
    x = torch.as_tensor(inputs(workload, "torch", args.n))

    def reference() -> torch.Tensor:
        model.train()
        try:
            with torch.no_grad():
                return torch.stack([model(x) for _ in range(args.t)])
        finally:
            model.eval()

    runs = {"train() loop": reference}
    try:
        copies_values = [int(c) for c in args.copies.split(",")]
    except ValueError:
        parser.error(f"--copies: expected comma-separated integers, got {args.copies!r}")
    if min(copies_values) < 1:
        parser.error(f"--copies: expected integers >= 1, got {args.copies!r}")
    for copies in copies_values:
        runs[f"vectorized x{copies}"] = lambda c=copies: mcu.sample(
            model, x, args.t, strategy="vectorized", precision=args.precision, chunk_size=args.n * c)
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    reference_ms = 1e3 * statistics.median(times["train() loop"])
    print(f"BERT N={args.n} T={args.t}, {args.precision}; medians of {args.rounds} interleaved rounds")
    for name, values in times.items():
        ms = 1e3 * statistics.median(values)
        print(f"{name:16s} {ms:8.1f} ms  {reference_ms / ms:5.2f}x the fp32 train() loop")


if __name__ == "__main__":
    main()
