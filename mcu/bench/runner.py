"""The worker: runs benchmark tasks for ONE backend in a fresh process and streams one JSON line per task.

``python -m mcu.bench.runner`` reads ``{"backend", "settings", "tasks": [...]}`` on stdin. Task kinds:

- ``timing``: one case (workload, N, T) and its configurations (mcu strategy x precision, or an external).
  Each configuration gets a probe (two calls at min(T, 10) samples: the first is the cold call, reported as
  ``first_call_s``; skipped when the second projects a run above ``max_run_seconds``), a warm-up run at the
  full T (reported separately as ``warmup_s``), a second full-T call that sizes the rounds (the warm-up may
  include one-off work such as ``auto``'s probe for this T), then ``repeats`` rounds that visit every configuration
  once, in a seeded random order drawn per round. Reported: median, quartiles, min/max, samples/s and the speed-up over
  ``loop``/fp32 as the median of the per-round ratios (the two ran back to back, so drift cancels).
- ``memory``: one configuration; the process is fresh, so its peak RSS belongs to it alone.
- ``precision``: bf16/fp16 against fp32 with the same seed, and fp32 against fp32 with another seed.
- ``convergence``: the article's test, mean predictive std (and entropy) against T over several seeds.
- ``peak``: the framework's plain matmul throughput (GFLOP/s) in fp32 and bf16 at a transformer's dense-layer
  shapes, the reference for the GFLOP/s of the transformer workload's dense layers.

A configuration that raises becomes a row with ``status="FAILED"`` and the error; the case goes on.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from mcu.bench import external
from mcu.bench.memory import address_space_limit, peak_rss_mb, reset_peak, rss_mb
from mcu.bench.precision import compare, convergence_metrics
from mcu.bench.workloads import WORKLOADS, Workload, custom_workload, inputs

MARK = "@@BENCH "
REFERENCE = {"strategy": "loop", "precision": "fp32", "kind": "mcu"}

Run = Callable[[Any, int], np.ndarray]


class Skipped(Exception):
    """A configuration left out on purpose (too slow to repeat); reported with ``status="skipped"``."""


def emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def workload_from(spec: dict) -> Workload:
    if spec.get("factory"):
        return custom_workload(spec["factory"], tuple(spec["input_shape"]), spec.get("task", "classification"))
    return WORKLOADS[spec["name"]]


def error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


# --- the framework edge: thread settings, tensors -------------------------------------------------------------

def setup(backend: str, settings: dict) -> dict:
    """Import the framework, apply thread settings, and describe them (recorded with every result)."""
    threads = settings.get("threads")
    if backend == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        env = {"threads": {"torch.get_num_threads": torch.get_num_threads(),
                           "torch.get_num_interop_threads": torch.get_num_interop_threads()},
               "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
               "mkldnn_fp16_supported": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
               "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    else:
        import keras
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        env = {"threads": {"tf.intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                           "tf.inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                           "note": "0 = TensorFlow's default (all cores)"},
               "keras_backend": keras.backend.backend(),
               "gpus": len(tf.config.list_physical_devices("GPU"))}
    address_space_limit(int(settings.get("memory_limit_bytes") or 0))
    return env


def to_tensor(backend: str, x: np.ndarray) -> Any:
    if backend == "torch":
        import torch

        return torch.from_numpy(x)
    import tensorflow as tf

    return tf.constant(x)


def make_run(config: dict, workload: Workload, backend: str, model: Any, settings: dict, info: dict) -> Run:
    """``run(x, T) -> samples`` for a configuration; ``info`` receives what mcu chose (strategy, chunk size)."""
    if config["kind"] == "external":
        return external.make(config["strategy"], backend, workload.build(backend, seed=0))
    import mcu

    def run(x: Any, t: int) -> np.ndarray:
        samples, used = mcu.sample(
            model, x, t, strategy=config["strategy"], precision=config["precision"],
            chunk_size=settings.get("chunk_size"), backend=backend, return_info=True,
        )
        copies = used.details.get("copies_per_pass")
        info.update(chosen=used.strategy + (f" x{copies}" if copies else ""), chunk_size=used.chunk_size)
        return samples

    return run


def timed(run: Run, x: Any, t: int) -> float:
    """Seconds of one call, with Python's garbage collector paused during it (as ``timeit`` does): a full
    collection of a process holding TensorFlow's objects took ~260 ms here and landed on whichever
    configuration happened to be running. (Collecting before every call instead evicted the CPU caches and
    slowed short calls by ~30%.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        run(x, t)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def probe(run: Run, x: Any, t: int, limit: float | None) -> float:
    """Raise :class:`Skipped` if one run at ``t`` samples is projected (from a second short run at up to 10
    samples) to take longer than ``limit`` seconds: keeps e.g. emulated fp16 from eating the budget.
    Returns the time of the first, cold call (imports, tracing, one-time choices)."""
    small = min(t, 10)
    first = timed(run, x, small)
    projected = timed(run, x, small) * t / small
    if limit and projected > limit:
        raise Skipped(f"too slow: projected {projected:.0f} s per run (from a {small}-sample probe) > "
                      f"--max-run-seconds {limit:g}")
    return first


# --- tasks -----------------------------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict[str, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": min(values), "max": max(values)}


def run_timing(task: dict, settings: dict) -> list[dict]:
    backend, n, t = task["backend"], task["n"], task["t"]
    workload = workload_from(task["workload"])
    x = to_tensor(backend, inputs(workload, backend, n))
    model = workload.build(backend, seed=0)
    rows, active = [], []  # active: (row, run)
    for config in task["configs"]:
        row = {"backend": backend, "workload": workload.name, "n": n, "t": t, **config, "status": "ok",
               "error": None, "note": None}
        if workload.transformer:  # the GFLOP/s of its dense layers are reported against the matmul peak
            row["dense_gflop_per_row"] = workload.gflop_per_row
        rows.append(row)
        try:
            info: dict = {}
            run = make_run(config, workload, backend, model, settings, info)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row["first_call_s"] = probe(run, x, t, settings.get("max_run_seconds"))
                row["warmup_s"] = timed(run, x, t)
                # a second call sizes the rounds: the warm-up may include one-off work (auto's probe for
                # this T, seconds on a CNN), which must not cut the number of repeats
                kept: list = []
                row["round_s"] = timed(lambda x_, t_: kept.append(run(x_, t_)), x, t)
                if workload.transformer:  # the spread of the samples, to compare with the train() loop's
                    row["sample_std"] = float(np.asarray(kept[0], dtype=np.float64).std(axis=0).mean())
            row["note"] = "; ".join(sorted({str(w.message).split(";")[0] for w in caught})) or None
            row.update(info)
            active.append((row, run))
        except Skipped as exc:
            row.update(status="skipped", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure of one configuration is a FAILED row
            row.update(status="FAILED", error=error_text(exc))
    if not active:
        return rows
    round_s = sum(row["round_s"] for row, _ in active)
    repeats = max(1, min(settings["repeats"], int(settings.get("case_seconds", 1e9) // max(round_s, 1e-9))))
    times: list[list[float]] = [[] for _ in active]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(repeats):
            # A fresh seeded order each round, so each configuration follows different ones. A rotation kept
            # the neighbours fixed: `auto` always ran right after the loop and measured 1.02 ms against
            # 0.76 ms for `prefix` with the same configuration (MLP, N=1); what the predecessor leaves
            # behind (cache contents) was not pinned down.
            for i in random.Random(r).sample(range(len(active)), len(active)):
                row, run = active[i]
                if row["status"] != "ok":
                    continue
                try:
                    times[i].append(timed(run, x, t))
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory in a later round
                    row.update(status="FAILED", error=f"in repeat {r + 1}: {error_text(exc)}")
    reference = next((i for i, (row, _) in enumerate(active)
                      if row["status"] == "ok" and all(row[k] == v for k, v in REFERENCE.items())), None)
    for i, (row, _) in enumerate(active):
        if row["status"] != "ok":
            continue
        s = _stats(times[i])
        row.update(repeats=repeats, times_s=times[i], median_s=s["median"], q1_s=s["q1"], q3_s=s["q3"],
                   min_s=s["min"], max_s=s["max"], samples_per_s=n * t / s["median"])
        if reference is not None:
            ratios = _stats([a / b for a, b in zip(times[reference], times[i])])
            row.update(speedup=ratios["median"], speedup_q1=ratios["q1"], speedup_q3=ratios["q3"])
    return rows


def run_memory(task: dict, settings: dict) -> list[dict]:
    backend, n, t, config = task["backend"], task["n"], task["t"], task["config"]
    workload = workload_from(task["workload"])
    x = to_tensor(backend, inputs(workload, backend, n))
    model = workload.build(backend, seed=0)
    info: dict = {}
    run = make_run(config, workload, backend, model, settings, info)
    row = {"backend": backend, "workload": workload.name, "n": n, "t": t, **config, "status": "ok", "error": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(x[:1], 1)  # one row, one sample: loads kernels and traces without holding big buffers
            gc.collect()
            baseline = rss_mb()
            row["peak_reset"] = reset_peak()
            row["seconds"] = timed(run, x, t)
        peak = peak_rss_mb()
        row.update(baseline_mb=baseline, peak_mb=peak, delta_mb=peak - baseline, chosen=info.get("chosen"))
    except Exception as exc:  # noqa: BLE001
        row.update(status="FAILED", error=error_text(exc))
    return [row]


def _sample(model: Any, x: Any, t: int, backend: str, settings: dict, **kwargs: Any) -> np.ndarray:
    import mcu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mcu.sample(model, x, t, backend=backend, chunk_size=settings.get("chunk_size"), **kwargs)


def run_precision(task: dict, settings: dict) -> list[dict]:
    """Same strategy and seed as the fp32 reference, so the dropout masks match and only precision differs
    (``prefix``: per-sample masks on both backends, the same in every precision)."""
    backend, n, t, strategy = task["backend"], task["n"], task["t"], task.get("strategy", "prefix")
    workload = workload_from(task["workload"])
    x = to_tensor(backend, inputs(workload, backend, n))
    model = workload.build(backend, seed=0)
    reference = _sample(model, x, t, backend, settings, strategy=strategy, seed=0)
    rows = []
    for precision, seed in [("fp32", 1)] + [(p, 0) for p in task["precisions"] if p != "fp32"]:
        row = {"backend": backend, "workload": workload.name, "n": n, "t": t, "strategy": strategy,
               "precision": precision, "seed": seed, "against": "fp32 seed 0", "status": "ok", "error": None}
        try:
            run = lambda x_, t_, p=precision, s=seed: _sample(model, x_, t_, backend, settings, strategy=strategy,
                                                              precision=p, seed=s)
            probe(run, x, t, settings.get("max_run_seconds"))
            row.update(compare(reference, run(x, t), workload.task))
        except Skipped as exc:
            row.update(status="skipped", error=str(exc))
        except Exception as exc:  # noqa: BLE001
            row.update(status="FAILED", error=error_text(exc))
        rows.append(row)
    return rows


def run_convergence(task: dict, settings: dict) -> list[dict]:
    backend, n, ts = task["backend"], task["n"], sorted(task["ts"])
    workload = workload_from(task["workload"])
    x = to_tensor(backend, inputs(workload, backend, n))
    model = workload.build(backend, seed=0)
    per_t: dict[int, list[dict]] = {t: [] for t in ts}
    for seed in range(task["seeds"]):
        samples = _sample(model, x, ts[-1], backend, settings, seed=seed)  # the first t samples are a t-sample draw
        for t in ts:
            per_t[t].append(convergence_metrics(samples[:t], workload.task))
    rows = []
    for t in ts:
        for metric in per_t[t][0]:
            values = [m[metric] for m in per_t[t]]
            rows.append({"backend": backend, "workload": workload.name, "n": n, "t": t, "metric": metric,
                         "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                         "seeds": len(values)})
    return rows


#: (rows, inner, columns) of the matmuls timed by ``peak``: a transformer's projections and feed-forward at
#: 8 x 30 sequences of 64 tokens, hidden 256, feed-forward 1024 (the transformer workload's default case)
PEAK_SHAPES = ((15360, 256, 1024), (15360, 1024, 256), (15360, 256, 256))


def _matmul(backend: str, rows: int, inner: int, cols: int, precision: str) -> Callable[[], Any]:
    """One ``(rows, inner) @ (inner, cols)`` product per call, in ``precision``, result materialised."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner), dtype=np.float32)
    b = rng.standard_normal((inner, cols), dtype=np.float32)
    if backend == "torch":
        import torch

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
        return lambda: torch.matmul(ta, tb)
    import tensorflow as tf

    dtype = {"fp32": tf.float32, "bf16": tf.bfloat16}[precision]
    ta, tb = tf.cast(tf.constant(a), dtype), tf.cast(tf.constant(b), dtype)
    product = tf.function(lambda: tf.matmul(ta, tb))
    return lambda: product().numpy()


def run_peak(task: dict, settings: dict) -> list[dict]:
    """Best-of-``repeats`` GFLOP/s of a plain matmul per shape and precision, each timed over calls of ~0.2 s."""
    backend, rows = task["backend"], []
    for precision in task.get("precisions", ["fp32", "bf16"]):
        for shape in PEAK_SHAPES:
            row = {"backend": backend, "kind": "peak", "precision": precision, "shape": "x".join(map(str, shape)),
                   "status": "ok", "error": None}
            try:
                call = _matmul(backend, *shape, precision)
                call()
                calls = max(1, int(0.2 / max(timed(lambda *_: call(), None, 0), 1e-6)))
                best = min(timed(lambda *_: [call() for _ in range(calls)], None, 0) / calls
                           for _ in range(max(3, settings.get("repeats", 3))))
                row.update(seconds=best, gflops=2 * shape[0] * shape[1] * shape[2] / best / 1e9)
            except Exception as exc:  # noqa: BLE001
                row.update(status="FAILED", error=error_text(exc))
            rows.append(row)
    return rows


TASKS = {"timing": run_timing, "memory": run_memory, "precision": run_precision, "convergence": run_convergence,
         "peak": run_peak}


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the process that started us dies, so no worker outlives an interrupted run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    _die_with_parent()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    job = json.loads(sys.stdin.read())
    backend, settings = job["backend"], job["settings"]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # user model factories are imported relative to where mcu bench ran
    emit({"type": "env", "backend": backend, **setup(backend, settings)})
    for task in job["tasks"]:
        start = time.perf_counter()
        try:
            rows = TASKS[task["kind"]](task, settings)
            error = None
        except Exception as exc:  # noqa: BLE001 - a broken task (e.g. the model cannot be built) must not stop the rest
            rows, error = [], error_text(exc)
            traceback.print_exc(file=sys.stderr)
        emit({"type": "result", "id": task["id"], "rows": rows, "error": error, "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
