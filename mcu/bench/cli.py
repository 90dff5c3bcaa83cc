"""``mcu bench`` (``python -m mcu.bench``): speed, memory and precision of the MC-dropout strategies.

Examples:
    mcu bench --quick                                  # MLP and CNN, both backends, a few minutes
    mcu bench --full --markdown benchmarks/RESULTS.md  # the whole suite (under 30 minutes on 2 cores)
    mcu bench --model mypkg.models:make_model --input-shape 3,32,32 --backend torch
    mcu bench --plan --full                            # print the plan and the time estimate, run nothing
    mcu bench --workloads transformer --strategies loop,vectorized,auto --precisions fp32,bf16 \
        --externals article-loop                       # BERT / Keras encoder, N=8, T=30, with matmul peaks
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from mcu.bench import external, suite
from mcu.bench.machine import machine_info
from mcu.bench.report import text, write_all
from mcu.bench.workloads import WORKLOADS, custom_workload
from mcu.core.progress import show_progress

PROFILES = {  # values of suite.Settings fields (workloads by name)
    "quick": {
        "workloads": ["mlp", "cnn"], "cases": [(64, 100), (1, 100)], "repeats": 3, "precisions": ["fp32", "bf16"],
        "memory_cases": [(64, 100)], "memory_workloads": ["cnn"], "memory_precisions": ["fp32"], "memory_jobs": 2,
        "precision_case": (64, 100), "convergence_seeds": 3, "convergence_n": 16, "max_run_seconds": 30.0,
        "case_seconds": 15.0,
    },
    "full": {
        "workloads": [w for w in WORKLOADS if not WORKLOADS[w].transformer],
        "cases": [(n, t) for n in (1, 64, 1024) for t in (10, 50, 100, 200)],
        "repeats": 5, "precisions": ["fp32", "bf16", "fp16"], "precision_cases": {"fp16": [(64, 100), (1, 100)]},
        "max_case_gflop": 100.0, "memory_cases": [(64, 100)], "memory_jobs": 2, "precision_case": (64, 100),
        "convergence_seeds": 5, "convergence_n": 32, "max_run_seconds": 15.0, "case_seconds": 12.0,
    },
}
BACKEND_MODULES = {"torch": "torch", "tensorflow": "tensorflow"}
#: options that replace the profile's value of the Settings field of the same name when given
OVERRIDES = ("repeats", "max_run_seconds", "case_seconds", "max_case_gflop", "memory_cases", "memory_jobs",
             "memory_precisions", "memory_strategies", "convergence_ts", "convergence_seeds", "convergence_n",
             "threads", "chunk_size")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcu bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="MLP and CNN, N=64/T=100 and N=1/T=100 (the default)")
    size.add_argument("--full", action="store_true", help="4 workloads, N in 1,64,1024 x T in 10,50,100,200")
    p.add_argument("--backend", metavar="NAME", default="all", help="torch | tensorflow | all installed (default)")
    p.add_argument("--workloads", metavar="LIST", type=_names, help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--strategies", metavar="LIST", type=_names, help="comma list (default: auto and every registered strategy)")
    p.add_argument("--precisions", metavar="LIST", type=_names, help="comma list of fp32, bf16, fp16")
    p.add_argument("--repeats", metavar="K", type=int, help="timed repeats per configuration (after the warm-up)")
    p.add_argument("--n", metavar="N,...", type=_ints, help="batch sizes N (comma list); crossed with --t")
    p.add_argument("--t", metavar="T,...", type=_ints, help="sample counts T (comma list); crossed with --n")
    p.add_argument("--externals", metavar="LIST", type=_names, help="external reference rows: comma list of "
                   f"{', '.join(external.EXTERNALS)} (default: all installed) or 'none'")
    p.add_argument("--no-externals", action="store_true", help="same as --externals none")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--no-precision-impact", action="store_true", help="skip the bf16/fp16 accuracy study")
    p.add_argument("--no-convergence", action="store_true", help="skip the convergence-vs-T study")
    p.add_argument("--memory-cases", metavar="N,T;...", type=lambda s: [tuple(_ints(c)) for c in s.split(";")],
                   help="N,T pairs for the memory runs, e.g. '64,100;1024,10'")
    p.add_argument("--memory-strategies", metavar="LIST", type=_names, help="strategies of the memory runs (default: all timed)")
    p.add_argument("--memory-precisions", metavar="LIST", type=_names, help="precisions of the memory runs (default fp32,bf16)")
    p.add_argument("--memory-jobs", metavar="K", type=int, help="memory worker processes at once (default 2)")
    p.add_argument("--convergence-t", metavar="T,...", dest="convergence_ts", type=_ints, help="T values of the convergence curve")
    p.add_argument("--precision-case", type=_ints, metavar="N,T", help="size of the precision study (default 64,100)")
    p.add_argument("--convergence-n", metavar="N", type=int, help="examples in the convergence study")
    p.add_argument("--convergence-seeds", metavar="K", type=int, help="seeds per T for the convergence error bars")
    p.add_argument("--threads", metavar="K", type=int, help="intra-op threads for torch and TensorFlow (default: theirs)")
    p.add_argument("--chunk-size", metavar="ROWS", type=int, help="passed to mcu.sample")
    p.add_argument("--max-run-seconds", metavar="S", type=float, help="skip a configuration projected slower per run")
    p.add_argument("--case-seconds", metavar="S", type=float, help="fewer repeats when a round of a case is this slow")
    p.add_argument("--max-case-gflop", metavar="GF", type=float, help="leave out cases with more work than this")
    p.add_argument("--model", metavar="MODULE:FUNCTION", help="benchmark your own model (factory, no arguments)")
    p.add_argument("--input-shape", metavar="D,...", type=_ints, help="per-example input shape for --model, e.g. 3,32,32")
    p.add_argument("--task", choices=["classification", "regression"], default="classification",
                   help="--model outputs logits (classification, default) or values (regression)")
    p.add_argument("--out", metavar="DIR", type=Path, default=Path("bench-results"), help="output folder (default ./bench-results)")
    p.add_argument("--markdown", metavar="PATH", type=Path, help="also write the tables as Markdown to this file")
    p.add_argument("--plan", action="store_true", help="print the plan and the estimated time, run nothing")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="a progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", action="store_true", help="no progress bar (default: MCU_PROGRESS, else a "
                     "bar only on a terminal)")
    return p


def settings_from(args: argparse.Namespace) -> suite.Settings:
    """The profile's settings, overridden by the options given."""
    profile = "full" if args.full else "quick"
    values = dict(PROFILES[profile])
    values["backends"] = _backends(args.backend)
    if args.model:
        if args.backend == "all" or not args.input_shape:
            raise SystemExit("--model needs --backend torch|tensorflow and --input-shape (e.g. 3,32,32)")
        values["workloads"] = [custom_workload(args.model, tuple(args.input_shape), args.task)]
    else:
        names = args.workloads or values["workloads"]
        _check("--workloads", names, WORKLOADS)
        values["workloads"] = [WORKLOADS[w] for w in names]
        own = [c for w in values["workloads"] for c in w.cases]
        if own and all(w.cases for w in values["workloads"]) and not (args.n or args.t):
            # workloads with their own sizes (the transformer): those cases, and the studies at the largest
            cases = list(dict.fromkeys(own))
            largest = max(cases, key=lambda c: c[0] * c[1])
            values.update(cases=cases, memory_cases=[largest], memory_workloads=None, precision_case=largest,
                          convergence_ts=sorted({t for _, t in cases} | {10}), convergence_n=largest[0])
    from mcu.strategies import STRATEGIES  # imports no framework

    values["strategies"] = args.strategies or ["auto", *[s for s in STRATEGIES if s != "auto"]]
    for name in values["strategies"]:
        if name != "auto" and name not in STRATEGIES:
            print(f"note: strategy {name!r} is not registered in this mcu; its rows will be FAILED", file=sys.stderr)
    if args.precisions:
        _check("--precisions", args.precisions, ("fp32", "bf16", "fp16"))
        values.update(precisions=args.precisions, precision_cases={})
    if args.n or args.t:  # the memory and precision studies follow, at the largest case, unless given
        cases = values["cases"]
        values["cases"] = [(n, t) for n in (args.n or sorted({n for n, _ in cases}))
                           for t in (args.t or sorted({t for _, t in cases}))]
        largest = max(values["cases"], key=lambda c: c[0] * c[1])
        values.update(memory_cases=[largest], precision_case=largest)
    if args.externals:
        _check("--externals", args.externals, [*external.EXTERNALS, "none"])
    values["externals"] = ([] if args.no_externals or args.externals == ["none"]
                           else args.externals or list(external.EXTERNALS))
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.precision_case:
        values["precision_case"] = tuple(args.precision_case)
    if args.no_memory:
        values["memory_cases"] = []
    if args.no_precision_impact:
        values["precision_case"] = None
    if args.no_convergence:
        values["convergence_seeds"] = 0
    return suite.Settings(**values, profile=profile)


def _backends(choice: str) -> list[str]:
    installed = [b for b, module in BACKEND_MODULES.items() if importlib.util.find_spec(module) is not None]
    if choice not in (*BACKEND_MODULES, "all"):
        raise SystemExit(f"--backend: expected torch, tensorflow or all, got {choice!r}")
    if choice != "all" and choice not in installed:
        raise SystemExit(f'--backend: {choice} is not installed (pip install "mcu[{choice}]")')
    if not installed:
        raise SystemExit('no backend installed: pip install "mcu[torch]" or "mcu[tensorflow]"')
    return installed if choice == "all" else [choice]


def _check(option: str, given: list[str], allowed: Sequence[str]) -> None:
    unknown = [v for v in given if v not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; expected some of {', '.join(allowed)}")


def describe(settings: suite.Settings) -> str:
    """The plan, one line per backend, with estimated minutes."""
    lines = []
    for backend, todo in suite.plan(settings).items():
        timing = [t for t in todo if t["kind"] == "timing"]
        memory, memory_s = suite.memory_plan(settings, backend)
        seconds = suite.STARTUP_S[backend] + sum(suite.estimate_seconds(settings, t) for t in todo) + memory_s
        lines.append(f"  {backend}: {len(timing)} timing cases x {len(timing[0]['configs']) if timing else 0} "
                     f"configurations, {sum(t['kind'] == 'precision' for t in todo)} precision and "
                     f"{sum(t['kind'] == 'convergence' for t in todo)} convergence studies, "
                     f"up to {len(memory)} memory runs; ~{seconds / 60:.1f} min")
    return "\n".join(lines)


class Progress:
    """Counts estimated seconds done; shows a tqdm bar on a terminal and prefixes log lines with an ETA that
    rescales the estimate by the speed seen so far."""

    def __init__(self, total: float, bar: bool = True) -> None:
        self.total, self.done, self.start = total, 0.0, time.perf_counter()
        self.bar = None
        if bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=round(total), unit="s", file=sys.stderr, disable=False, dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| est. {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]")
            except ImportError:
                pass

    def add(self, seconds: float) -> None:
        self.total += seconds
        if self.bar is not None:
            self.bar.total = round(self.total)
            self.bar.refresh()

    def update(self, seconds: float) -> None:
        seconds = min(seconds, self.total - self.done)
        self.done += seconds
        if self.bar is not None:
            self.bar.update(seconds)

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        left = (self.total - self.done) * elapsed / self.done if self.done else self.total
        return f"{elapsed / 60:4.1f} min, ETA {left / 60:4.1f} min"

    def write(self, line: str) -> None:
        line = f"[{self.eta()}] {line}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def unwritable(out: Path, markdown: Path | None) -> str | None:
    """Why the results could not be written to ``out`` (a folder) and ``markdown`` (a file), or ``None``."""
    for path, argument in ((out, "--out"), *(((markdown.parent, "--markdown"),) if markdown is not None else ())):
        if argument == "--markdown" and markdown.is_dir():
            return f"--markdown: expected a file path, got the folder {str(markdown)!r}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".mcu-bench-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"{argument}: expected a folder the results can be written to, got {str(path)!r} ({exc.strerror or exc})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `mcu bench -- --quick`
        argv = argv[1:]
    p = parser()
    args = p.parse_args(argv)
    problem = None if args.plan else unwritable(args.out, args.markdown)
    if problem:  # before the run, not after it: the results would be lost
        p.error(problem)
    settings = settings_from(args)
    estimate = suite.estimate_total(settings)
    print(f"mcu bench ({settings.profile}): estimated {estimate / 60:.1f} min (ETA refined while running)\n"
          f"{describe(settings)}", flush=True)
    if args.plan:
        return 0
    progress = Progress(estimate, bar=show_progress(True if args.progress else False if args.no_progress else None))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    try:
        results = suite.run(settings, progress=progress, log=progress.write)
    finally:
        progress.close()
    results = {"meta": {"started": started, "seconds": time.perf_counter() - start, "machine": machine_info(),
                        "settings": settings.to_json()}, **results}
    print()
    print(text(results))
    written = write_all(results, args.out, args.markdown)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
