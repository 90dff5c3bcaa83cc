"""First-call peak memory of ``mcu.sample``, repeated in fresh processes: the spread, not one draw of it.

``mcu bench`` measures each strategy's peak once per run (a fresh process per row). For ``auto`` that first
call includes its probe, whose peak depends on how the C allocator laid out the many block sizes it tried, so
one run says little. This runs the same measurement (:func:`mcu.bench.runner.run_memory`: a one-row warm-up,
then ``VmHWM`` minus RSS around one call) ``--rounds`` times per configuration, one process at a time, the
configurations alternating within each round, and prints medians and ranges. ``--compare DIR`` adds
``auto`` from another checkout of mcu (e.g. ``git worktree add /tmp/old HEAD~1``), run in the same rounds
(mcu and its benchmark code both imported from there; from a checkout older than ``mcu.bench``, its
``benchmarks.runner``).

Run: python -m benchmarks.first_call_memory [--backend torch] [--workload cnn] [--n 64] [--t 100]
         [--strategies loop,auto] [--rounds 10] [--compare DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import Counter


def _run(args: argparse.Namespace, strategy: str, root: str) -> dict:
    """One measurement in a fresh process, with mcu (and the benchmark code) imported from ``root``."""
    task = {"backend": args.backend, "n": args.n, "t": args.t, "workload": {"name": args.workload},
            "config": {"kind": "mcu", "strategy": strategy, "precision": "fp32"}}
    code = (f"import json, sys\nsys.path.insert(0, {os.path.abspath(root)!r})\n"
            "try:\n    from mcu.bench.runner import run_memory\n"
            "except ModuleNotFoundError as e:  # a checkout from before mcu.bench: its benchmarks package\n"
            "    if e.name not in ('mcu.bench', 'mcu.bench.runner'):\n        raise\n"
            "    from benchmarks.runner import run_memory\n"
            f"print(json.dumps(run_memory({task!r}, {{}})[0], default=str))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "tensorflow"])
    parser.add_argument("--workload", default="cnn", help="mlp, cnn, deep-mlp or regression")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--t", type=int, default=100)
    parser.add_argument("--strategies", default="loop,auto", help="comma list")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compare", metavar="DIR", help="another mcu checkout: its 'auto' joins every round")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: expected a positive number of rounds")
    if args.compare and not os.path.isdir(os.path.join(args.compare, "mcu")):
        parser.error(f"--compare: expected a checkout of mcu (a directory with mcu/ in it), got {args.compare!r}")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    configs = [(name, here) for name in args.strategies.split(",")]
    if args.compare:
        configs.append(("auto", args.compare))
    rows: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for strategy, root in configs:
            label = strategy if root == here else f"auto ({args.compare})"
            row = _run(args, strategy, root)
            if row["status"] != "ok":
                print(f"round {r + 1}: {label} FAILED: {row['error']}")
                continue
            rows.setdefault(label, []).append(row)
            print(f"round {r + 1}: {label:<24s} +{row['delta_mb']:6.1f} MB  {row['seconds']:6.2f} s")
    print(f"\n{args.backend} {args.workload} N={args.n} T={args.t}, {args.rounds} rounds (added peak MB over the RSS "
          "after a one-row warm-up)")
    for label, got in rows.items():
        deltas = [row["delta_mb"] for row in got]
        seconds = statistics.median(row["seconds"] for row in got)
        chosen = Counter(row.get("chosen", "") for row in got)
        print(f"{label:<24s} median {statistics.median(deltas):6.1f}  range {min(deltas):.1f}-{max(deltas):.1f}"
              f"  call {seconds:.2f} s  {dict(chosen) if any(chosen) else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
