"""Peak extra memory of ``mcu.predict`` (streaming) vs the dense ``(T, N, C)`` samples array.

Each mode runs in a fresh subprocess: build the model and inputs, reset the peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), run, read ``VmHWM`` from ``/proc/self/status``. The extra peak is
``VmHWM - RSS before the run``. The dense array alone is ``T * N * C * 4`` bytes.

Run: python -m benchmarks.predict_memory [--n 50000] [--classes 10] [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, n: int, classes: int, samples: int) -> dict:
    import numpy as np
    import torch

    import mcu
    from mcu import metrics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(128, classes))
    x = np.random.default_rng(0).standard_normal((n, 32)).astype(np.float32)
    mcu.predict(model, x[:64], 4, seed=0)  # import/allocator warm-up outside the measurement
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _rss_kb("VmRSS")
    start = time.perf_counter()
    if mode == "dense":
        dense = mcu.sample(model, x, samples, seed=0)
        result = metrics.mutual_information(dense, from_logits=True)
    else:
        result = mcu.predict(model, x, samples, seed=0).mutual_information
    seconds = time.perf_counter() - start
    peak = _rss_kb("VmHWM")
    return {"mode": mode, "extra_peak_mb": (peak - before) / 1024, "seconds": seconds, "checksum": float(result.sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--child", choices=["dense", "predict"])
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.classes, args.samples)))
        return 0
    array_mb = args.samples * args.n * args.classes * 4 / 2**20
    print(f"dense (T, N, C) float32 array: {array_mb:.0f} MB (T={args.samples}, N={args.n}, C={args.classes})")
    rows = []
    for mode in ("dense", "predict"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.predict_memory", "--child", mode, "--n", str(args.n),
                              "--classes", str(args.classes), "--samples", str(args.samples)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{mode:8s} extra peak {rows[-1]['extra_peak_mb']:8.1f} MB   time {rows[-1]['seconds']:6.2f} s")
    ratio = rows[1]["extra_peak_mb"] / array_mb
    print(f"mcu.predict extra peak / dense array = {ratio:.3f} (target < 0.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
