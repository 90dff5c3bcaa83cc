"""The plan (which cases, configurations and extra studies) and its execution in worker processes.

The main process never imports a framework. Per backend it starts one worker (``mcu.bench.runner``) for the
timing cases, the precision and the convergence studies, then one fresh worker per memory configuration.
Backends and workers run one after another, never side by side (except memory workers with ``memory_jobs``
> 1: peak RSS is per process, but then no timing is taken from them). A worker that dies (e.g. killed for
memory) turns its current task into FAILED rows and a new worker takes the remaining tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from mcu.bench import external
from mcu.bench.memory import available_bytes
from mcu.bench.report import label
from mcu.bench.runner import MARK, REFERENCE
from mcu.bench.workloads import Workload

__all__ = ["Settings", "estimate_seconds", "estimate_total", "memory_plan", "plan", "run"]

# Rough costs for the ETA (2 Zen 4 cores); the progress bar rescales them by the speed it actually sees.
GFLOPS = {"fp32": 60.0, "bf16": 80.0, "fp16": 5.0}
PASS_OVERHEAD_S = {"torch": 1e-4, "tensorflow": 5e-4}
STARTUP_S = {"torch": 2.0, "tensorflow": 5.0}
CONFIG_OVERHEAD_S = {"torch": 0.1, "tensorflow": 0.4}  # probes, tracing, auto's first-call probe
MEMORY_TASK_S = {"torch": 3.0, "tensorflow": 9.0}  # fresh process: import, build, trace
CUSTOM_GFLOP_PER_ROW = 0.01
PEAK_TASK_S = 8.0  # the matmul peak: 3 shapes x 2 precisions x repeats of ~0.2 s


@dataclass
class Settings:
    backends: list[str]
    workloads: list[Workload]
    cases: list[tuple[int, int]]  # (N, T)
    strategies: list[str]
    precisions: list[str]
    externals: list[str] = field(default_factory=lambda: list(external.EXTERNALS))
    repeats: int = 5
    max_run_seconds: float = 20.0  # a configuration projected slower than this per run is skipped
    case_seconds: float = 30.0  # fewer repeats when one round of a case takes longer than this / repeats
    max_case_gflop: float | None = None  # leave out cases with more work (N x T x GFLOP per row)
    precision_cases: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # precision -> only these (N, T)
    memory_cases: list[tuple[int, int]] = field(default_factory=list)
    memory_workloads: list[str] | None = None  # None: all selected workloads
    memory_strategies: list[str] | None = None  # None: every configuration that ran (externals by their name)
    memory_precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    memory_jobs: int = 1
    precision_case: tuple[int, int] | None = (64, 100)
    convergence_ts: list[int] = field(default_factory=lambda: [10, 20, 50, 100, 200])
    convergence_seeds: int = 5
    convergence_n: int = 32
    threads: int | None = None
    chunk_size: int | None = None
    profile: str = "custom"

    def worker_settings(self, processes: int = 1) -> dict[str, Any]:
        """What a worker needs; ``processes`` running at once share 85% of the available memory."""
        return {"threads": self.threads, "chunk_size": self.chunk_size, "repeats": self.repeats,
                "max_run_seconds": self.max_run_seconds, "case_seconds": self.case_seconds,
                "memory_limit_bytes": int(0.85 * available_bytes() / processes)}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["workloads"] = [w.name if not w.factory else asdict(w) for w in self.workloads]
        return out


def _workload_spec(w: Workload) -> dict[str, Any]:
    return {"name": w.name} if not w.factory else {"factory": w.factory, "input_shape": list(w.input_shape),
                                                   "task": w.task}


def _work(w: Workload, n: int, t: int) -> float:
    return n * t * (w.gflop_per_row or CUSTOM_GFLOP_PER_ROW)


def _run_s(backend: str, w: Workload, n: int, t: int, precision: str, cap: float) -> float:
    return min(cap, _work(w, n, t) / GFLOPS[precision] + t * PASS_OVERHEAD_S[backend])


def configs(settings: Settings, backend: str, case: tuple[int, int] | None = None) -> list[dict[str, str]]:
    """mcu strategy x precision (loop/fp32 always included: it is the speed-up reference), then externals.
    A precision listed in ``precision_cases`` is only included at those cases."""
    precisions = [p for p in settings.precisions
                  if case is None or p not in settings.precision_cases or tuple(case) in map(tuple, settings.precision_cases[p])]
    out = [dict(REFERENCE)]
    out += [{"strategy": s, "precision": p, "kind": "mcu"} for s in settings.strategies for p in precisions]
    out += [{"strategy": name, "precision": "fp32", "kind": "external"}
            for name in settings.externals if external.available(name, backend)]
    unique = []
    for config in out:
        if config not in unique:
            unique.append(config)
    return unique


def plan(settings: Settings) -> dict[str, list[dict]]:
    """Tasks per backend (memory tasks are added after timing, for the configurations that ran)."""
    tasks: dict[str, list[dict]] = {}
    for backend in settings.backends:
        todo = []
        for w in settings.workloads:
            for n, t in settings.cases:
                if settings.max_case_gflop and w.gflop_per_row and _work(w, n, t) > settings.max_case_gflop:
                    continue
                todo.append({"kind": "timing", "workload": _workload_spec(w), "n": n, "t": t,
                             "configs": configs(settings, backend, (n, t))})
            if settings.precision_case and set(settings.precisions) - {"fp32"}:
                n, t = settings.precision_case
                todo.append({"kind": "precision", "workload": _workload_spec(w), "n": n, "t": t,
                             "precisions": settings.precisions})
            if settings.convergence_seeds and settings.convergence_ts:
                todo.append({"kind": "convergence", "workload": _workload_spec(w), "n": settings.convergence_n,
                             "ts": settings.convergence_ts, "seeds": settings.convergence_seeds})
        if any(w.transformer for w in settings.workloads):  # the reference for its dense layers' GFLOP/s
            todo.insert(0, {"kind": "peak", "n": None, "precisions": ["fp32", "bf16"]})
        for i, task in enumerate(todo):
            task.update(id=i, backend=backend)
        tasks[backend] = todo
    return tasks


def memory_tasks(settings: Settings, backend: str, timing_rows: list[dict]) -> list[dict]:
    """One task per configuration at each memory case (N, T), in the memory precisions, if the configuration
    ran in timing (at that case when it was timed, else at any case): failed and too-slow ones are not retried."""
    status: dict[tuple, list[str]] = {}
    for r in timing_rows:
        key = (r["workload"], r["strategy"], r["precision"], r.get("kind"))
        status.setdefault(key, []).append(r["status"])
        status.setdefault(key + (r["n"], r["t"]), []).append(r["status"])
    todo = []
    chosen = [w for w in settings.workloads if w.name in (settings.memory_workloads or [])] or settings.workloads
    for w in chosen:
        for n, t in settings.memory_cases:
            if settings.max_case_gflop and w.gflop_per_row and _work(w, n, t) > settings.max_case_gflop:
                continue
            for c in configs(settings, backend):
                key = (w.name, c["strategy"], c["precision"], c["kind"])
                seen = status.get(key + (n, t)) or status.get(key, [])
                wanted = settings.memory_strategies is None or c["strategy"] in settings.memory_strategies
                if wanted and c["precision"] in settings.memory_precisions and "ok" in seen:
                    todo.append({"kind": "memory", "workload": _workload_spec(w), "n": n, "t": t, "config": c})
    for i, task in enumerate(todo):
        task.update(id=i, backend=backend)
    return todo


def memory_plan(settings: Settings, backend: str, timing_rows: list[dict] | None = None) -> tuple[list[dict], float]:
    """The memory tasks and their estimated wall time; before timing (``timing_rows=None``) every
    configuration is assumed to run."""
    if timing_rows is None:
        timing_rows = [{"workload": w.name, **c, "n": -1, "t": -1, "status": "ok"}
                       for w in settings.workloads for c in configs(settings, backend)]
    todo = memory_tasks(settings, backend, timing_rows)
    for task in todo:
        task["est"] = estimate_seconds(settings, task) / max(1, settings.memory_jobs)
    return todo, sum(t["est"] for t in todo)


def estimate_seconds(settings: Settings, task: dict) -> float:
    """A rough duration for the progress bar and the ETA."""
    backend, kind = task["backend"], task["kind"]
    if kind == "peak":
        return PEAK_TASK_S
    w = next(w for w in settings.workloads if _workload_spec(w) == task["workload"])
    cap = settings.max_run_seconds
    if kind == "timing":
        runs = [_run_s(backend, w, task["n"], task["t"], c["precision"], cap) for c in task["configs"]]
        round_s = sum(runs)
        repeats = max(1, min(settings.repeats, int(settings.case_seconds // max(round_s, 1e-9))))
        probes = sum(_run_s(backend, w, task["n"], 1, c["precision"], cap) for c in task["configs"])
        return 2 * probes + round_s * (1 + repeats) + CONFIG_OVERHEAD_S[backend] * len(runs)
    if kind == "memory":
        return MEMORY_TASK_S[backend] + 1.2 * _run_s(backend, w, task["n"], task["t"], task["config"]["precision"], cap)
    if kind == "precision":
        return sum(_run_s(backend, w, task["n"], task["t"], p, cap) for p in ["fp32", "fp32", *task["precisions"]])
    return task["seeds"] * _run_s(backend, w, task["n"], max(task["ts"]), "fp32", cap)


def _worker(backend: str, settings: Settings, tasks: list[dict], on_result: Callable[[dict, dict], None],
            processes: int = 1) -> dict:
    """Run ``tasks`` in worker processes (restarting after a crash); return the worker's environment report.
    ``processes``: how many workers run at once (they share the memory limit)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    if backend == "tensorflow":
        env["KERAS_BACKEND"] = "tensorflow"  # the tensorflow backend means Keras 3 on TensorFlow
    root = str(Path(__file__).resolve().parents[2])  # the directory holding this mcu: the worker imports it
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    pending = list(tasks)
    report: dict = {}
    while pending:
        job = json.dumps({"backend": backend, "settings": settings.worker_settings(processes), "tasks": pending})
        proc = subprocess.Popen([sys.executable, "-m", "mcu.bench.runner"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        stderr_tail: list[str] = []
        reader = threading.Thread(target=_keep_tail, args=(proc.stderr, stderr_tail))
        reader.start()
        try:
            proc.stdin.write(job)
            proc.stdin.close()
            by_id = {t["id"]: t for t in pending}
            for line in proc.stdout:
                if not line.startswith(MARK):
                    continue
                message = json.loads(line[len(MARK):])
                if message["type"] == "env":
                    report = message
                else:
                    task = by_id[message["id"]]
                    pending.remove(task)
                    on_result(task, message)
        finally:
            if proc.poll() is None and pending:  # we are failing (or interrupted): do not leave the worker behind
                proc.kill()
        code = proc.wait()
        reader.join()
        if pending:  # the worker died inside pending[0]
            why = f"worker process died (exit code {code}{', killed: out of memory?' if code < 0 else ''})"
            detail = " | ".join(stderr_tail[-2:])
            on_result(pending.pop(0), {"rows": [], "error": f"{why}: {detail}"[:300]})
    return report


def _keep_tail(stream: IO[str], tail: list[str]) -> None:
    """Drain a worker's stderr (so it never blocks on a full pipe), keeping the last lines for error messages."""
    tail.extend(stream.read().splitlines()[-5:])


def _one_task_worker(backend: str, settings: Settings, on_result: Callable[[dict, dict], None], processes: int,
                     task: dict) -> dict:
    return _worker(backend, settings, [task], on_result, processes)


def failed_rows(task: dict, error: str) -> list[dict]:
    """FAILED rows for a task whose worker could not report any."""
    if task["kind"] == "peak":
        return [{"backend": task["backend"], "kind": "peak", "precision": p, "workload": None, "status": "FAILED",
                 "error": error} for p in task["precisions"]]
    base = {"backend": task["backend"], "workload": task["workload"].get("name", "custom"), "n": task["n"],
            "status": "FAILED", "error": error}
    if task["kind"] == "timing":
        return [{**base, "t": task["t"], **c} for c in task["configs"]]
    if task["kind"] == "memory":
        return [{**base, "t": task["t"], **task["config"]}]
    return [{**base, "t": task.get("t"), "kind": task["kind"]}]


def estimate_total(settings: Settings) -> float:
    total = 0.0
    for backend, todo in plan(settings).items():
        total += STARTUP_S[backend] + sum(estimate_seconds(settings, t) for t in todo)
        total += memory_plan(settings, backend)[1]
    return total


def run(settings: Settings, progress: Any = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Execute the plan; return ``{"timing", "memory", "precision", "convergence": rows, "backends": env,
    "tasks": estimated and measured seconds per task}``, and ``"peak"`` rows (matmul GFLOP/s) when a
    transformer workload runs.

    ``progress`` (optional) gets ``update(estimated_seconds)`` per finished task and ``add(seconds)`` when
    the memory plan is known; ``log`` gets one line per finished task."""
    results: dict[str, Any] = {"timing": [], "memory": [], "precision": [], "convergence": [], "backends": {},
                               "tasks": []}

    def on_result(task: dict, message: dict) -> None:
        rows = message["rows"] or failed_rows(task, message.get("error") or "no result")
        results.setdefault(task["kind"], []).extend(rows)  # "peak" only when a transformer workload runs
        results["tasks"].append({"backend": task["backend"], "kind": task["kind"], "workload": rows[0].get("workload"),
                                 "n": task["n"], "t": task.get("t"), "estimated_s": task["est"],
                                 "seconds": message.get("seconds")})
        if progress is not None:
            progress.update(task["est"])
        log(_task_line(task, rows))

    for backend, todo in plan(settings).items():
        start = time.perf_counter()
        for task in todo:
            task["est"] = estimate_seconds(settings, task)
        results["backends"][backend] = _worker(backend, settings, todo, on_result)
        if progress is not None:
            progress.update(STARTUP_S[backend])
        mem, seconds = memory_plan(settings, backend, [r for r in results["timing"] if r["backend"] == backend])
        if progress is not None:
            progress.add(seconds - memory_plan(settings, backend)[1])
        jobs = max(1, settings.memory_jobs)
        with ThreadPoolExecutor(jobs) as pool:  # each task is its own fresh process
            list(pool.map(partial(_one_task_worker, backend, settings, on_result, jobs), mem))
        results["backends"][backend]["seconds"] = time.perf_counter() - start
    return results


def _task_line(task: dict, rows: list[dict]) -> str:
    if task["kind"] == "peak":
        return f"{task['backend']:<10} matmul peak " + ", ".join(
            f"{r['precision']} {r['shape']}: " + (f"{r['gflops']:.0f} GFLOP/s" if r.get("gflops") else r["status"])
            for r in rows)
    head = f"{task['backend']:<10} {task['kind']:<11} {rows[0]['workload']:<10} N={task['n']:<5}"
    if task["kind"] == "timing":
        return f"{head} T={task['t']:<4} " + ", ".join(_config_cell(r) for r in rows)
    if task["kind"] == "memory":
        r = rows[0]
        what = f"+{r['delta_mb']:.1f} MB (peak {r['peak_mb']:.0f} MB)" if r.get("delta_mb") is not None else r["status"]
        return f"{head} T={task['t']:<4} {label(r)}/{r.get('precision')}: {what}"
    if task["kind"] == "precision":
        return f"{head} T={task['t']:<4} " + ", ".join(
            f"{r.get('precision')}: z median {r['mean_z_median']:.3g}" if "mean_z_median" in r
            else f"{r.get('precision')} {r.get('status')}" for r in rows)
    return f"{head} T={task['ts']} over {task['seeds']} seeds: " + (
        "done" if all("mean" in r for r in rows) else "FAILED")


def _config_cell(r: dict) -> str:
    name = f"{label(r)}/{r['precision']}" if r.get("kind") == "mcu" else label(r)
    if r.get("status") == "ok" and r.get("median_s") is not None:
        speed = f" {r['speedup']:.2f}x" if r.get("speedup") is not None else ""
        return f"{name} {1e3 * r['median_s']:.3g}ms{speed}"
    return f"{name} {r.get('status')}"
