"""Time and minor page faults per ``mcu.sample`` call, back to back in one process (PyTorch workloads).

With glibc's default ``malloc`` settings, multi-MB buffers that are freed and allocated again on every call
can be handed back to the kernel in between, and every call then pays page faults for them (~1.4 us each on
this VM). This measures it: run it once as it is and once with, e.g.,
``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456`` in the environment (or jemalloc
preloaded) and compare. Calls run back to back (warm caches), unlike ``mcu bench``'s interleaved rounds.

Run: python -m benchmarks.page_faults [--workload cnn] [--n 1] [--t 100] [--strategy auto] [--calls 50]
"""

from __future__ import annotations

import argparse
import resource
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cnn", help="mlp, cnn, deep-mlp or regression")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--t", type=int, default=100)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls: expected a positive number of calls")

    import torch

    import mcu
    from mcu.bench.machine import allocator_env
    from mcu.bench.workloads import WORKLOADS, inputs

    if args.workload not in WORKLOADS:
        parser.error(f"--workload: expected one of {', '.join(WORKLOADS)}, got {args.workload!r}")
    workload = WORKLOADS[args.workload]
    model = workload.build("torch", seed=0)
    x = torch.from_numpy(inputs(workload, "torch", args.n))
    for _ in range(6):  # the first call probes (auto); the rest settle the allocator
        mcu.sample(model, x, args.t, strategy=args.strategy)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.calls):
        mcu.sample(model, x, args.t, strategy=args.strategy)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    malloc = allocator_env()
    print(f"{args.workload} N={args.n} T={args.t} {args.strategy}: {1e3 * seconds / args.calls:.2f} ms/call, "
          f"{(after.ru_minflt - before.ru_minflt) / args.calls:.0f} minor page faults/call, "
          f"system time {1e3 * (after.ru_stime - before.ru_stime) / args.calls:.2f} ms/call; "
          f"malloc: {malloc or 'glibc defaults'}")


if __name__ == "__main__":
    main()
