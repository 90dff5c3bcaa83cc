"""MC-dropout pool scoring on a Ray cluster: Ray Data batch inference with a pool of model-holding actors.

How a run goes:

1. The driver checks the arguments and, by default, loads the model once itself (``preflight``) so that an
   unsafe file, a missing dropout layer or a bad factory fails fast with an :class:`~mcu.errors.MCUError`.
2. The pool becomes a list of *sources* with known row counts (:mod:`mcu.distributed.sources`): a numpy array
   put once in the object store, Parquet files (counts from the footers, data never read by the driver), or
   the blocks of a Ray Dataset. Global index = position across the sources.
3. The work is a small Ray Dataset of *task descriptors*, one row per task: a range of global positions that
   is a whole number of batches of ``batch_size``. Batch ``c`` covers ``[c·b, (c+1)·b)`` exactly as in
   :func:`mcu.predict`, and is sampled with the seed of batch ``c`` derived from the run's ``seed`` — so the
   result equals the single-machine one for the same ``seed``, ``batch_size`` and ``strategy``, whatever the
   number of workers or the grouping of batches into tasks.
4. ``map_batches`` with an :class:`ray.data.ActorPoolStrategy` runs the tasks: each actor limits its
   framework's threads to its CPU allocation, loads the model once, then reads the rows of each task it gets
   (only those rows) and returns one Arrow table per task. Ray Data restarts an actor that dies and retries
   its task (its defaults for actor pools are ``max_restarts=-1`` and ``max_task_retries=-1``); a task's
   output is a single block, so a killed attempt leaves nothing behind and every example is written once.
5. ``predict`` streams the per-example tables to Parquet (``write_parquet``); ``query`` keeps the top rows of
   each task on the worker, then sorts the survivors by (score desc, index asc) and takes ``k`` with
   ``sort().limit()``: only ``k`` rows (with their samples for BatchBALD candidates) reach the driver.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from mcu.active.acquisition import SCORES, batch_bald, get_heuristic
from mcu._seeds import derive_seed
from mcu.active.querying import check_k, score_chunk, sorted_subset
from mcu.core.predict import DEFAULT_BATCH
from mcu._checks import check_choice, check_int, check_number
from mcu.core.scoring import TASKS, check_stopping_rule, score_batch
from mcu.distributed.loading import ModelSource, describe, load_model
from mcu.distributed.results import prediction_from_table, read_prediction, to_table
from mcu.distributed.sources import (
    filesystem_and_path,
    Pool,
    PoolReader,
    _default_column,
    check_shape,
    columns_of,
    features_from_numpy,
    parquet_sources,
    structured_leaves,
)
from mcu import errors
from mcu.errors import InputError, MCUError
from mcu.strategies import STRATEGIES
from mcu.structured import OUTPUT_HELP, take_rows

__all__ = ["RunSummary", "chunk_seed", "predict", "query"]

_SAMPLE_OPTIONS = ("chunk_size", "precision", "backend", "mode", "max_memory", "workers")
#: rows of the pool a task holds at once (tasks are whole batches; at least one batch)
_TASK_ROWS = 65536


#: the seed of global batch ``chunk`` (the old name of :func:`mcu._seeds.derive_seed`): the seed
#: :func:`mcu.predict` gives its batch ``chunk`` and :func:`mcu.active.query` its chunk ``chunk``, computed by any
#: worker from ``seed`` and ``chunk`` alone
chunk_seed = derive_seed


@dataclass
class RunSummary:
    """What :func:`predict` wrote, and how the work was split."""

    output: str
    n_items: int
    n_batches: int
    n_tasks: int
    batch_size: int
    num_workers: int
    cpus_per_worker: float
    threads_per_worker: int
    strategy: str
    model: str
    seconds: float

    @property
    def items_per_second(self) -> float:
        return self.n_items / self.seconds if self.seconds > 0 else float("nan")

    def read(self) -> Any:
        """The whole result as a :class:`mcu.Prediction` in pool order (see :func:`read_prediction`)."""
        return read_prediction(self.output)


# ----------------------------------------------------------------------------------------------- workers


def threads_for(cpus_per_worker: float) -> int:
    """Intra-op threads for an actor holding ``cpus_per_worker`` CPUs (at least one)."""
    return max(1, int(cpus_per_worker))


def _limit_threads(threads: int) -> None:
    """Size every math library of this process to ``threads`` (call before and after loading the model).

    Environment variables cover libraries not imported yet (OpenMP/MKL/OpenBLAS read them at load time,
    TensorFlow when its runtime starts); frameworks already imported are set through their APIs.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[name] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        with contextlib.suppress(RuntimeError, AttributeError):  # fixed once the TF runtime has started
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)


_CARRIED = re.compile(r"<mcu-error (\w+)>(.*?)</mcu-error>", re.S)


def _carry_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Worker side: put an MCUError's class and message in the text of the exception Ray Data transmits."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except MCUError as exc:
            raise RuntimeError(f"<mcu-error {type(exc).__name__}>{exc}</mcu-error>") from exc

    return wrapper


class _Worker:
    """A Ray Data actor: loads the model once, then scores whole tasks (ranges of global batches)."""

    @_carry_errors
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        _limit_threads(job["threads"])
        self.model = None if job["model"] is None else load_model(job["model"])
        _limit_threads(job["threads"])
        self.reader = PoolReader(job["pool"])
        subset = job.get("subset")
        self.subset = None if subset is None else np.asarray(ray.get(subset))

    @_carry_errors
    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        tables = [self._task(int(lo), int(hi)) for lo, hi in zip(batch["lo"], batch["hi"])]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def _chunks(self, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
        """``(global batch, pool indices, x, ids)`` of each batch in positions ``[lo, hi)``."""
        b = self.job["batch_size"]
        indices = np.arange(lo, hi, dtype=np.int64) if self.subset is None else self.subset[lo:hi]
        x, ids = self.reader.read(indices) if self.model is not None else (None, None)
        for c in range(lo // b, -(-hi // b)):
            rows = slice(c * b - lo, min((c + 1) * b, hi) - lo)
            yield c, indices[rows], None if x is None else take_rows(x, rows), None if ids is None else ids[rows]

    def _task(self, lo: int, hi: int) -> Any:
        return self._predict(lo, hi) if self.job["mode"] == "predict" else self._query(lo, hi)

    def _predict(self, lo: int, hi: int) -> Any:
        import pyarrow as pa

        j = self.job
        tables = []
        for c, indices, x, ids in self._chunks(lo, hi):
            values, _ = score_batch(self.model, x, n_samples=j["n_samples"], task=j["task"],
                                    from_logits=j["from_logits"], seed=derive_seed(j["seed"], c),
                                    strategy=j["strategy"], tol=j["tol"], max_samples=j["max_samples"],
                                    score=j["score"], noise_var=j["noise_var"],
                                    heteroscedastic=j["heteroscedastic"], **j["sample_options"])
            if j["task"] == "classification":
                values["label"] = np.argmax(values["mean_probabilities"], axis=-1)
            tables.append(to_table(indices, ids, values))
        return pa.concat_tables(tables)

    def _query(self, lo: int, hi: int) -> Any:
        j = self.job
        heuristic, keep = j["heuristic"], j["keep"]
        all_indices, all_scores, all_samples = [], [], []
        for c, indices, x, _ in self._chunks(lo, hi):
            scores, samples = score_chunk(self.model, x, heuristic=heuristic, n_samples=j["n_samples"],
                                          seed=derive_seed(j["seed"], c), from_logits=j["from_logits"],
                                          strategy=j["strategy"], n_examples=len(indices), **j["sample_options"])
            if heuristic == "batchbald":
                all_samples.append(np.moveaxis(samples, 1, 0))  # (n, T, C): one row per example
            all_indices.append(indices)
            all_scores.append(np.asarray(scores, dtype=np.float64))
        indices, scores = np.concatenate(all_indices), np.concatenate(all_scores)
        order = np.lexsort((indices, -scores))[:keep]  # score desc, then index asc: as mcu.active.query
        values: dict[str, np.ndarray] = {"score": scores[order]}
        if all_samples:
            values["samples"] = np.concatenate(all_samples)[order]
        return to_table(indices[order], None, values)


# ------------------------------------------------------------------------------------------------ driver


def _check_selection(value: Any, argument: str) -> dict[str, Any]:
    """``output=`` of the sampling calls as a sample option, checked on the driver: a name, an index, or a
    callable that can be pickled to the workers."""
    if value is None:
        return {}
    if callable(value):
        import cloudpickle  # ships with Ray

        try:
            cloudpickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the workers cannot receive it
            raise InputError(
                f"{argument}: the callable {value!r} cannot be pickled for the Ray workers ({type(exc).__name__}: "
                f"{exc}); expected a key or attribute name (e.g. 'logits'), an integer index, or a picklable "
                "callable (a module-level function)."
            ) from exc
    elif isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{argument}: expected {OUTPUT_HELP}, got {value!r}.")
    return {"output": value}


def _ensure_ray() -> None:
    if not ray.is_initialized():
        # Connects to RAY_ADDRESS or a cluster started on this machine with `ray start`; else starts one.
        ray.init()


@ray.remote(num_cpus=0)
def _count_rows(value: Any) -> int:
    if isinstance(value, dict):
        return len(next(iter(value.values())))
    return len(value)


def _make_pool(data: Any, column: Any, shape: Any, id_column: str | None, argument: str = "data") -> Pool:
    shape = check_shape(shape)
    if id_column is not None and not isinstance(id_column, str):
        raise InputError(f"id_column: expected a column name, got {id_column!r}.")
    if isinstance(data, ray.data.Dataset):
        names = list(data.schema().names)
        column = _default_column(column, names, id_column, "the Ray Dataset")
        for name in columns_of(column, id_column):
            if name not in names:
                arg = "id_column" if name == id_column else "column"
                raise InputError(f"{arg}: {name!r} is not a column of the Ray Dataset; its columns: {names}.")
        options = getattr(data, "context", ray.data.DataContext.get_current()).execution_options
        saved, options.preserve_order = options.preserve_order, True  # row order = pool order, every run
        try:
            refs = data.select_columns(columns_of(column, id_column)).to_numpy_refs()
        finally:
            options.preserve_order = saved
        counts = ray.get([_count_rows.remote(ref) for ref in refs])
        sources = [{"kind": "numpy", "ref": ref, "rows": int(n)} for ref, n in zip(refs, counts) if n]
        return Pool(sources, column, shape, id_column)
    if isinstance(data, (str, os.PathLike)) or (
        isinstance(data, (list, tuple)) and data and all(isinstance(p, (str, os.PathLike)) for p in data)
    ):
        sources, column = parquet_sources(data, column, id_column)
        return Pool(sources, column, shape, id_column)
    if isinstance(data, (Mapping, tuple)):  # inputs passed by name or in order, e.g. token ids + attention mask
        if column is not None or id_column is not None or shape is not None:
            raise InputError("column, id_column, shape: only for Parquet files, Ray Datasets and array pools, not "
                             f"for a dict or tuple of arrays ({argument}).")
        keys, leaves = structured_leaves(data, argument)
        n = len(leaves[0])
        # one object holds every input: a worker gets the rows of all inputs from one source, in pool order
        sources = [{"kind": "numpy", "ref": ray.put(leaves), "rows": n}] if n else []
        return Pool(sources, structure=(keys, len(leaves)))
    if hasattr(data, "__array__") and getattr(data, "shape", None) is not None:
        if column is not None or id_column is not None:
            raise InputError("column, id_column: only for Parquet files and Ray Datasets, not for an array pool.")
        array = np.asarray(data)
        if array.ndim == 0:
            raise InputError("data: expected an array with a batch axis first, got a 0-d array.")
        if shape is not None and len(array):
            array = features_from_numpy(array, None, shape)
        return Pool([{"kind": "numpy", "ref": ray.put(array), "rows": len(array)}] if len(array) else [])
    raise InputError(
        f"{argument}: expected a numpy array, a dict (or tuple) of arrays sharing the batch axis, Parquet path(s) "
        f"(a file, a directory or a list; local or a URI such as s3://...), or a ray.data.Dataset, got "
        f"{type(data).__qualname__}."
    )


_check_number = check_number  # the shared check (NaN and infinities refused)


def _check_cluster_args(num_workers: Any, cpus_per_worker: Any, gpus_per_worker: Any, chunks_per_task: Any,
                        sample_options: dict[str, Any]) -> None:
    check_int(num_workers, "num_workers", minimum=1, allow_none=True)
    _check_number(cpus_per_worker, "cpus_per_worker", minimum=0, strict=True)
    _check_number(gpus_per_worker, "gpus_per_worker", minimum=0, strict=False)
    check_int(chunks_per_task, "chunks_per_task", minimum=1, allow_none=True)
    unknown = sorted(set(sample_options) - set(_SAMPLE_OPTIONS))
    if unknown:
        raise InputError(f"{unknown[0]}: unknown option; expected one of {', '.join(_SAMPLE_OPTIONS)}.")


def _num_workers(num_workers: int | None, cpus_per_worker: float, gpus_per_worker: float) -> int:
    if num_workers is not None:
        return num_workers
    resources = ray.cluster_resources()
    count = int(resources.get("CPU", 1) // cpus_per_worker)
    if gpus_per_worker:
        count = min(count, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, count)


def _preflight(source: ModelSource, backend: str | None) -> None:
    from mcu.backends import resolve

    model = load_model(source)
    impl, _ = resolve(model, backend)
    impl.dropout_layers(model)  # NoDropoutError here rather than on every worker


def _descriptors(n_positions: int, batch_size: int, chunks_per_task: int | None,
                 num_workers: int) -> list[dict[str, int]]:
    n_chunks = -(-n_positions // batch_size)
    if chunks_per_task is None:  # about four tasks per worker for balance, each at most ~_TASK_ROWS rows
        chunks_per_task = max(1, min(-(-n_chunks // (4 * num_workers)), _TASK_ROWS // batch_size))
    step = chunks_per_task * batch_size
    return [{"lo": lo, "hi": min(lo + step, n_positions)} for lo in range(0, n_positions, step)]


def _run(descriptors: list[dict[str, int]], job: dict[str, Any], num_workers: int, cpus_per_worker: float,
         gpus_per_worker: float, ray_remote_args: dict[str, Any] | None) -> Any:
    """The lazy Ray Dataset of per-task result tables."""
    tasks = ray.data.from_items(descriptors, override_num_blocks=len(descriptors))
    return tasks.map_batches(
        _Worker,
        batch_size=1,  # one descriptor = one task = whole global batches
        batch_format="numpy",
        compute=ActorPoolStrategy(size=num_workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        fn_constructor_kwargs={"job": job},
        **dict(ray_remote_args or {}),
    )


@contextlib.contextmanager
def _ray_errors(progress: bool) -> Iterator[None]:
    """Progress bars on or off for this run; an MCUError raised on a worker is re-raised as itself."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = bool(progress)
    try:
        yield
    except MCUError:
        raise
    except Exception as exc:
        # Ray Data wraps worker exceptions (RayTaskError(UserCodeException)) and drops their cause, keeping
        # the text: _carry_errors put the error's class and message there between markers.
        match = _CARRIED.search(str(exc))
        kind = getattr(errors, match.group(1), None) if match else None
        if isinstance(kind, type) and issubclass(kind, MCUError):
            raise kind(f"{match.group(2)} (raised on a Ray worker)") from exc
        raise
    finally:
        context.enable_progress_bars = saved


def _check_output(output: Any, overwrite: bool) -> tuple[str, Callable[[], None]]:
    """The output location, and a function that empties it (called just before writing)."""
    from pyarrow import fs as pafs

    if not isinstance(output, (str, os.PathLike)):
        raise InputError(
            f"output: expected a directory path or URI for the Parquet files, got {type(output).__qualname__}."
        )
    text = os.fspath(output)
    filesystem, path = filesystem_and_path(text)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError(f"output: {text!r} is a file; expected a directory (new, empty, or with overwrite=True).")
    entries = []
    if info.type == pafs.FileType.Directory:
        entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
        if entries and not overwrite:
            raise InputError(
                f"output: directory {text!r} is not empty; pass overwrite=True to replace its Parquet files, or a new "
                "directory (results of two runs in one directory would hold every example twice)."
            )
        others = [e.base_name for e in entries
                  if not (e.type == pafs.FileType.File and e.base_name.endswith(".parquet"))]
        if others:
            raise InputError(
                f"output: directory {text!r} holds files other than Parquet files ({others[:3]}); refusing to "
                "overwrite it. Choose another directory."
            )

    def clear() -> None:
        for entry in entries:
            filesystem.delete_file(entry.path)

    return (text if "://" in text else path), clear


def predict(
    model: Any,
    data: Any,
    n_samples: int | str = 50,
    *,
    output: str | os.PathLike[str] | None = None,
    task: str = "classification",
    from_logits: bool = True,
    seed: int | None = None,
    strategy: str = "auto",
    batch_size: int | None = None,
    column: str | list[str] | None = None,
    shape: tuple[int, ...] | None = None,
    id_column: str | None = None,
    factory: Any = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    chunks_per_task: int | None = None,
    overwrite: bool = False,
    preflight: bool = True,
    progress: bool = False,
    ray_remote_args: dict[str, Any] | None = None,
    tol: float | None = None,
    max_samples: int = 1000,
    score: str | None = None,
    noise_var: Any = None,
    heteroscedastic: bool = False,
    model_output: Any = None,
    **sample_options: Any,
) -> RunSummary | Any:
    """:func:`mcu.predict` over a pool on a Ray cluster; per-example metrics written to a Parquet directory.

    The result equals ``mcu.predict(model, x, n_samples, seed=seed, batch_size=batch_size, strategy=strategy,
    ...)`` on one machine for an explicit ``strategy`` (``"auto"`` lets each actor time the strategies on its
    own hardware: exact in distribution, but the numbers then depend on which one wins).

    Args:
        model: a factory (``"package.module:function"`` or a picklable callable returning the model), a model
            file (TorchScript ``.pt``; a ``state_dict`` file with ``factory=``; a Keras ``.keras`` file) or a
            model object (pickled to the workers). Files are loaded safely (see :mod:`mcu.distributed.loading`).
        data: a numpy array ``(N, ...)``; a dict (or tuple) of arrays sharing the batch axis, the model's inputs
            by name (or in order), e.g. ``{"input_ids": ..., "attention_mask": ...}`` (put once in the object
            store; a worker reads the same rows of every input); Parquet path(s) (a file, a directory, a list;
            local or a URI) with ``column``; or a ``ray.data.Dataset`` (executed once into the object store; its
            row order is the pool order — set ``DataContext.execution_options.preserve_order = True`` when
            reading files).
        n_samples, task, from_logits, seed, strategy, batch_size, tol, max_samples, score, noise_var,
            heteroscedastic, **sample_options: as in :func:`mcu.predict` (``batch_size`` defaults to
            ``min(N, 4096)``); batch ``c`` is examples ``[c·b, (c+1)·b)`` with the seed of batch ``c``. The
            ``workers`` sample option (threads of the ``"parallel"`` strategy) defaults to the threads of one
            actor, not to the machine's CPU count.
        output: a directory for the Parquet files (a URI such as ``s3://bucket/scores`` or a shared file system
            on a multi-node cluster); must be new or empty unless ``overwrite``. ``None``: gather the results
            on the driver instead and return them as a :class:`mcu.Prediction`, as :func:`mcu.predict` does.
        model_output: what to sample when the model returns a structure: ``output=`` of :func:`mcu.predict`
            (which passes it here with ``engine="ray"``; named differently because ``output`` is the
            directory): a key or attribute name (``"logits"``), an integer index, or a picklable callable.
        column: the input column: one column of fixed-shape arrays (lists, fixed-size lists, Ray tensors) or a
            list of scalar columns; or, for a model taking named inputs, a mapping ``{input name: column}``
            (e.g. ``{"input_ids": "ids", "attention_mask": "mask"}``; each column holds fixed-shape examples,
            integers stay integers). Default: the only column that is not ``id_column``.
        shape: the per-example input shape, to reshape flattened features (e.g. ``(1, 28, 28)``).
        id_column: a column copied to the output as ``id``.
        factory: builds the architecture for a ``state_dict`` file.
        num_workers: actors in the pool (default: the cluster's CPUs // ``cpus_per_worker``).
        cpus_per_worker: CPUs reserved per actor; the actor's torch/TensorFlow threads are set to this
            (rounded down, at least 1) so that actors do not oversubscribe cores.
        gpus_per_worker: GPUs per actor (the factory is responsible for moving the model to the device).
        chunks_per_task: batches per Ray task (default: about four tasks per worker, at most ~65k rows each).
        overwrite: replace the Parquet files of a non-empty ``output`` directory.
        preflight: load the model once on the driver first, to fail fast on unsafe files or no dropout. Turn
            off when the driver cannot see the model file or lacks the memory.
        progress: show Ray Data's progress bars.
        ray_remote_args: extra arguments for ``map_batches`` (``resources``, ``runtime_env``,
            ``memory``, ``label_selector``, or, deprecated in Ray 2.60, ``max_restarts``/``max_task_retries``).

    Returns:
        With ``output``, a :class:`RunSummary` (``summary.read()`` loads the result as a
        :class:`mcu.Prediction`); without, the :class:`mcu.Prediction` in pool order.

    Shape:
        data: ``(N, ...)`` -> N Parquet rows: ``index``, [``id``], per-example metrics (``(C,)`` lists for
        ``mean_probabilities``). Worker memory ~ one task's inputs plus one batch's samples.

    Example:
        >>> run = predict("mypkg.models:build", x, 50, output="scores/", seed=0, batch_size=256,
        ...               strategy="vectorized", num_workers=8)                          # doctest: +SKIP
        >>> run.read().mutual_information.shape                                       # doctest: +SKIP
        (100000,)
    """
    check_choice(task, "task", TASKS)
    score = check_stopping_rule(n_samples, tol, max_samples, score, task)
    check_int(batch_size, "batch_size", minimum=1, allow_none=True)
    check_int(seed, "seed", minimum=0, allow_none=True)
    check_choice(strategy, "strategy", ["auto", *STRATEGIES])
    _check_cluster_args(num_workers, cpus_per_worker, gpus_per_worker, chunks_per_task, sample_options)
    selection = _check_selection(model_output, "model_output (output= of mcu.predict)")
    source = ModelSource.resolve(model, factory)
    target, clear_output = _check_output(output, overwrite) if output is not None else (None, lambda: None)
    if preflight:
        _preflight(source, sample_options.get("backend"))
    start = time.perf_counter()
    _ensure_ray()
    pool = _make_pool(data, column, shape, id_column)
    n = len(pool)
    if n == 0:
        raise InputError("data: expected a pool with at least one example (N >= 1), got N = 0.")
    batch = batch_size or min(n, DEFAULT_BATCH)
    num_workers = _num_workers(num_workers, cpus_per_worker, gpus_per_worker)
    threads = threads_for(cpus_per_worker)
    options = dict(sample_options, **selection)
    options.setdefault("workers", threads)  # threads of the 'parallel' strategy: the actor's share only
    job = {
        "mode": "predict", "model": source, "pool": pool, "batch_size": batch, "threads": threads,
        "n_samples": n_samples, "task": task, "from_logits": from_logits, "seed": seed, "strategy": strategy,
        "tol": tol, "max_samples": max_samples, "score": score, "noise_var": noise_var,
        "heteroscedastic": heteroscedastic, "sample_options": options,
    }
    descriptors = _descriptors(n, batch, chunks_per_task, num_workers)
    clear_output()
    with _ray_errors(progress):
        results = _run(descriptors, job, num_workers, cpus_per_worker, gpus_per_worker, ray_remote_args)
        if target is None:
            import pyarrow as pa

            tables = list(results.iter_batches(batch_size=None, batch_format="pyarrow"))
            return prediction_from_table(pa.concat_tables(tables), "the results of the Ray run")
        results.write_parquet(target)
    return RunSummary(
        output=target, n_items=n, n_batches=-(-n // batch), n_tasks=len(descriptors), batch_size=batch,
        num_workers=num_workers, cpus_per_worker=cpus_per_worker, threads_per_worker=threads, strategy=strategy,
        model=describe(source), seconds=time.perf_counter() - start,
    )


def query(
    model: Any,
    pool: Any,
    k: int,
    *,
    heuristic: str = "bald",
    n_samples: int = 30,
    batch_size: int = 256,
    seed: int | None = None,
    from_logits: bool = True,
    subset: Iterable[int] | None = None,
    n_candidates: int | None = None,
    strategy: str = "auto",
    column: str | list[str] | None = None,
    shape: tuple[int, ...] | None = None,
    factory: Any = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    chunks_per_task: int | None = None,
    preflight: bool = True,
    progress: bool = False,
    ray_remote_args: dict[str, Any] | None = None,
    output: Any = None,
    **sample_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mcu.active.query` on a Ray cluster: the global top ``k`` without collecting the pool.

    Chunk ``i`` (pool positions ``[i·b, (i+1)·b)``, of ``subset`` when given) is sampled with the seed
    ``derive_seed(seed, i)`` as in :func:`mcu.active.query`, so the answer is the same for the same
    ``seed``, ``batch_size`` and strategy. Each task keeps its own top rows on the worker (``k``; for
    BatchBALD the ``n_candidates`` best by BALD, with their samples); the survivors are sorted by
    (score desc, index asc) with Ray Data and limited to ``k`` (or ``n_candidates``), so only those rows reach
    the driver, where BatchBALD then chooses ``k`` among the candidates.

    Args:
        model, column, shape, factory, num_workers, cpus_per_worker, gpus_per_worker, chunks_per_task, preflight,
            progress, ray_remote_args, **sample_options: as in :func:`predict` (``model`` may be ``None`` for
            ``heuristic="random"``).
        pool: a numpy array, a dict (or tuple) of arrays sharing the batch axis, Parquet path(s) or a
            ``ray.data.Dataset`` (see :func:`predict`'s ``data``).
        k, heuristic, n_samples, batch_size, seed, from_logits, subset, n_candidates: as in
            :func:`mcu.active.query`.
        output: what to score when the model returns a structure, as in :func:`mcu.active.query`: a key or
            attribute name (``"logits"``), an integer index, or a picklable callable.
        strategy: the sampling strategy (``mcu.active.query`` uses ``"auto"``).

    Returns:
        ``(indices, scores)``: global pool indices ``(k,)`` int64 and scores ``(k,)`` float64, as
        :func:`mcu.active.query` returns them.
    """
    get_heuristic(heuristic)
    for value, name in ((k, "k"), (n_samples, "n_samples"), (batch_size, "batch_size")):
        check_int(value, name, minimum=1)
    check_int(seed, "seed", minimum=0, allow_none=True)
    check_int(n_candidates, "n_candidates", minimum=1, allow_none=True)
    check_choice(strategy, "strategy", ["auto", *STRATEGIES])
    _check_cluster_args(num_workers, cpus_per_worker, gpus_per_worker, chunks_per_task, sample_options)
    selection = _check_selection(output, "output")
    subset_array = sorted_subset(subset)
    source = None if heuristic == "random" else ModelSource.resolve(model, factory)
    if preflight and source is not None:
        _preflight(source, sample_options.get("backend"))
    _ensure_ray()
    data = _make_pool(pool, column, shape, None, "pool")
    n = len(data)
    if subset_array is not None and len(subset_array) and (subset_array[0] < 0 or subset_array[-1] >= n):
        raise InputError(
            f"subset: expected pool indices in [0, {n}), got values from {subset_array[0]} to {subset_array[-1]}."
        )
    available = n if subset_array is None else len(subset_array)
    check_k(k, available)
    pointwise = heuristic in SCORES
    keep = min(available, k if pointwise else max(k, n_candidates or max(4 * k, 256)))
    num_workers = _num_workers(num_workers, cpus_per_worker, gpus_per_worker)
    threads = threads_for(cpus_per_worker)
    options = dict(sample_options, **selection)
    options.setdefault("workers", threads)
    job = {
        "mode": "query", "model": source, "pool": data, "batch_size": batch_size, "threads": threads,
        "n_samples": n_samples, "from_logits": from_logits, "seed": seed, "strategy": strategy,
        "heuristic": heuristic, "keep": keep, "sample_options": options,
        "subset": None if subset_array is None else ray.put(subset_array),
    }
    descriptors = _descriptors(available, batch_size, chunks_per_task, num_workers)
    with _ray_errors(progress):
        survivors = _run(descriptors, job, num_workers, cpus_per_worker, gpus_per_worker, ray_remote_args)
        top = survivors.sort(["score", "index"], descending=[True, False]).limit(keep)
        table = top.take_batch(keep, batch_format="pyarrow")
    indices = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
    scores = np.asarray(table.column("score").to_numpy(), dtype=np.float64)
    if pointwise:
        return indices, scores
    flat = table.column("samples").combine_chunks()
    samples = flat.flatten().to_numpy(zero_copy_only=False).reshape(len(indices), n_samples, -1)
    local, gains = batch_bald(np.moveaxis(samples, 0, 1), k, from_logits=from_logits, seed=seed)
    return indices[local], gains
