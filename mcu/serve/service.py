"""The serving core, independent of the web framework: request checks, scoring a batch, triage, drift, metrics.

A :class:`Service` turns request bodies into input arrays (:meth:`Service.parse`, which raises a
:class:`RequestError` naming the field), scores a list of requests in one call (:meth:`Service.score`,
run in ONE worker thread by the HTTP layer) and turns the results into JSON rows. The HTTP layer
(:mod:`mcu.serve.app`, :mod:`mcu.serve.ray_serve`) only reads bodies, batches requests and writes responses.

**Independence from the batch.** Without a seed, the examples of all coalesced requests are stacked into
one :func:`mcu.predict` call (the fast strategies see ``N > 1``); every example gets its own dropout masks,
so its samples are independent of its batch mates in distribution. With a seed, the result of an example
must not depend on what it was batched with, so each example is sampled on its own with the seed derived
from the configured seed and its position in its request: a request equals
``mcu.predict(model, x, n_samples, seed=seed, batch_size=1)``. That costs ``T`` passes of one row per
example instead of sharing passes across the batch (several times slower under load; see
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import mcu
from mcu.errors import InputError
from mcu.monitor import DriftMonitor
from mcu.triage import Triage, load_thresholds

__all__ = ["RequestError", "Service", "load_reference", "save_reference"]

#: uncertainty scores a triage or the drift monitor may use, per task (higher = less certain)
SCORES = {
    "classification": ("predictive_entropy", "mutual_information", "expected_entropy", "variation_ratio"),
    "regression": ("std",),
}
REFERENCE_FORMAT = "mcu-drift-reference/1"
INPUT_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}


class RequestError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}`` (the message names the field)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class _Batch:
    """One sampling call: the rows of ``sizes`` requests stacked, padded to ``padded`` rows."""

    x: np.ndarray
    sizes: tuple[int, ...]


def save_reference(path: str | os.PathLike[str], scores: Any, *, score: str) -> None:
    """Write validation uncertainties as the drift monitor's reference (``mcu serve --reference``).

    The file is ``{"format": "mcu-drift-reference/1", "score": ..., "scores": [...]}``.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "reference.json"
        >>> save_reference(path, [0.1, 0.2, 0.4], score="predictive_entropy")
        >>> load_reference(path)
        (array([0.1, 0.2, 0.4]), 'predictive_entropy')
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size < 2 or not np.isfinite(values).all():
        raise InputError(f"scores: expected at least two finite uncertainties, got {values.size} value(s).")
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"format": REFERENCE_FORMAT, "score": score, "scores": values.tolist()}, file)


def load_reference(path: str | os.PathLike[str]) -> tuple[np.ndarray, str | None]:
    """Read drift reference uncertainties: a file from :func:`save_reference`, a JSON list, or a ``.npy`` array.

    Returns:
        The scores ``(M,)`` and the score name (``None`` when the file does not say).
    """
    text = os.fspath(path)
    try:
        if text.lower().endswith(".npy"):
            return np.asarray(np.load(text, allow_pickle=False), dtype=np.float64).reshape(-1), None
        with open(text, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, ValueError) as exc:
        raise InputError(f"reference: cannot read {text!r} ({exc}); expected a .json or .npy file.") from exc
    if isinstance(content, list):
        values, score = content, None
    elif isinstance(content, dict) and content.get("format") == REFERENCE_FORMAT:
        values, score = content.get("scores"), content.get("score")
    else:
        raise InputError(f"reference: {text!r} is neither a JSON list of uncertainties nor a file written by "
                         "mcu.serve.save_reference.")
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"reference: {text!r}: expected a list of numbers ({exc}).") from exc
    return array, score


class Service:
    """Scores requests with MC dropout for a server.

    Args:
        model: the PyTorch or Keras model (see :func:`mcu.sample`).
        n_samples: ``T``, stochastic passes per example.
        task: ``"classification"`` or ``"regression"``.
        from_logits: classification outputs are logits (else probabilities).
        seed: reproducible answers: each example is sampled alone with a seed derived from ``seed`` and its
            position in its request (see the module docstring for the cost). ``None``: batched sampling.
        strategy: as in :func:`mcu.sample`.
        triage: a :class:`mcu.triage.Triage`, or the path of a thresholds file
            (:func:`mcu.triage.save_thresholds`); adds a ``tier`` to every prediction.
        score: the uncertainty used for tiers, the drift monitor and the uncertainty histogram (default: the
            thresholds file's, else ``predictive_entropy`` / ``std``; regression ``std`` is averaged over outputs).
        reference: drift reference uncertainties (array) or a file (:func:`load_reference`).
        drift_window, drift_alpha: the :class:`mcu.monitor.DriftMonitor` window and per-window false-alarm rate.
        input_shape: the shape of one example; inferred from a Keras model, else checked by the model itself.
        input_dtype: ``"float32"`` (default), ``"float64"``, ``"int32"`` or ``"int64"`` (token ids).
        max_examples: most examples in one request.
        max_batch: most examples in one batched sampling call (unseeded).
        name: the model name in responses.
        interval_level: coverage of the regression ``interval`` (Gaussian, ``mean ± z·std``).
        metrics: a :class:`mcu.serve.metrics.ServeMetrics` to record into (default: a new one).
        **sample_options: passed to :func:`mcu.predict` (``precision``, ``chunk_size``, ``max_memory``, ...).
    """

    def __init__(
        self,
        model: Any,
        *,
        n_samples: int = 50,
        task: str = "classification",
        from_logits: bool = True,
        seed: int | None = None,
        strategy: str = "auto",
        triage: Triage | str | os.PathLike[str] | None = None,
        score: str | None = None,
        reference: Any = None,
        drift_window: int = 200,
        drift_alpha: float = 0.01,
        input_shape: Sequence[int] | None = None,
        input_dtype: str = "float32",
        max_examples: int = 1024,
        max_batch: int = 64,
        name: str = "model",
        interval_level: float = 0.95,
        metrics: Any = None,
        **sample_options: Any,
    ) -> None:
        from mcu.core.sampling import check_choice, check_int

        check_int(n_samples, "n_samples", minimum=1)
        check_choice(task, "task", tuple(SCORES))
        check_int(seed, "seed", minimum=0, allow_none=True)
        check_int(max_examples, "max_examples", minimum=1)
        check_int(max_batch, "max_batch", minimum=1)
        check_choice(input_dtype, "input_dtype", tuple(INPUT_DTYPES))
        if not isinstance(interval_level, numbers.Real) or not 0 < interval_level < 1:
            raise InputError(f"interval_level: expected a number in (0, 1), got {interval_level!r}.")
        self.model, self.n_samples, self.task, self.from_logits = model, int(n_samples), task, bool(from_logits)
        self.seed, self.strategy, self.name = seed, strategy, str(name)
        self.max_examples, self.max_batch, self.interval_level = int(max_examples), int(max_batch), interval_level
        self.input_dtype = np.dtype(INPUT_DTYPES[input_dtype])
        self.sample_options = sample_options
        file_score = None
        if isinstance(triage, (str, os.PathLike)):
            triage, file_score = load_thresholds(triage)
        if triage is not None and not isinstance(triage, Triage):
            raise InputError(f"triage: expected a Triage or a thresholds file path, got {type(triage).__qualname__}.")
        self.triage: Triage | None = triage
        reference_score = None
        if isinstance(reference, (str, os.PathLike)):
            reference, reference_score = load_reference(reference)
        named = {k: v for k, v in (("score", score), ("triage", file_score), ("reference", reference_score)) if v}
        if len(set(named.values())) > 1:
            raise InputError(f"score: the score names disagree: {named}; thresholds, reference and score= must "
                             "describe the same uncertainty.")
        self.score_name = next(iter(named.values()), SCORES[task][0])
        check_choice(self.score_name, "score", SCORES[task])
        self.monitor = None if reference is None else DriftMonitor(reference, window=drift_window, alpha=drift_alpha)
        self.input_shape = _input_shape(model, input_shape)
        self.backend = mcu.backend_info(model)["selected"]
        if metrics is None:
            from mcu.serve.metrics import ServeMetrics

            metrics = ServeMetrics()
        self.metrics = metrics
        self.strategies: dict[str, str] = {}  # batch rows -> strategy chosen by auto (what /v1/model shows)
        self._lock = threading.Lock()  # one sampling call on the model at a time
        self.ready = False

    # ------------------------------------------------------------------------------------------ requests

    def parse(self, body: bytes) -> np.ndarray:
        """The examples of a ``POST /v1/predict`` body, shape ``(n, *input_shape)``.

        Raises:
            RequestError: 400 for a body that is not ``{"inputs": [...]}`` with finite numbers of one shape,
                413 for more than ``max_examples`` examples.
        """
        try:
            content = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"body: expected JSON {{\"inputs\": [...]}}, got invalid JSON ({exc}).") from None
        except RecursionError:
            raise RequestError(400, "body: JSON nested too deeply.") from None
        if not isinstance(content, dict):
            raise RequestError(400, f"body: expected a JSON object {{\"inputs\": [...]}}, got {_json_type(content)}.")
        unknown = sorted(set(content) - {"inputs"})
        if unknown:
            raise RequestError(400, f"body: unexpected field(s) {unknown}; expected only \"inputs\".")
        if "inputs" not in content:
            raise RequestError(400, "inputs: missing; expected {\"inputs\": [...]} (one example or a list of examples).")
        inputs = content["inputs"]
        if isinstance(inputs, dict):
            raise RequestError(400, "inputs: named inputs (a JSON object) are not supported: mcu samples models "
                                    "with one input array; expected a list.")
        if not isinstance(inputs, list):
            raise RequestError(400, f"inputs: expected a list (one example or a list of examples), got "
                                    f"{_json_type(inputs)}.")
        if not inputs:
            raise RequestError(400, "inputs: expected at least one example, got an empty list.")
        x = self._array(inputs, body)
        x = self._examples(x)
        if len(x) > self.max_examples:
            raise RequestError(413, f"inputs: {len(x)} examples in one request; the maximum is {self.max_examples}.")
        return x

    def _array(self, inputs: list, body: bytes) -> np.ndarray:
        try:
            raw = np.asarray(inputs)
        except ValueError:
            raise RequestError(400, "inputs: expected a rectangular nested list of numbers (every example of the "
                                    "same shape), got lists of different lengths.") from None
        if raw.dtype.kind not in "iuf":
            kinds = {"U": "strings", "b": "booleans", "O": "null, mixed values or integers beyond 64 bits"}
            raise RequestError(400, f"inputs: expected numbers, got {kinds.get(raw.dtype.kind, raw.dtype.name)}.")
        if (b"true" in body or b"false" in body) and _has_bool(inputs):  # numpy turns [True, 2.0] into numbers
            raise RequestError(400, "inputs: expected numbers, got a boolean (true/false).")
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise RequestError(400, "inputs: contains NaN or infinite values; expected finite numbers.")
        if self.input_dtype.kind == "i":
            if raw.dtype.kind == "f":
                raise RequestError(400, f"inputs: expected integers (the model takes {self.input_dtype.name}), "
                                        "got numbers with a decimal point.")
            info = np.iinfo(self.input_dtype)
            if raw.size and (raw.min() < info.min or raw.max() > info.max):
                raise RequestError(400, f"inputs: integers out of the {self.input_dtype.name} range.")
        elif raw.dtype.kind in "iu" and np.abs(raw).max(initial=0) > 2**53:
            raise RequestError(400, "inputs: integers too large to be represented exactly as floats.")
        with np.errstate(over="ignore"):  # checked just below
            x = raw.astype(self.input_dtype, copy=False)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise RequestError(400, f"inputs: values beyond the {self.input_dtype.name} range.")
        return x

    def _examples(self, x: np.ndarray) -> np.ndarray:
        """One example or a list of examples -> ``(n, *input_shape)``."""
        if self.input_shape is None:
            return x[None] if x.ndim == 1 else x  # a flat list is one example; otherwise axis 0 lists examples
        shape = tuple(self.input_shape)
        if x.shape == shape:
            return x[None]
        if x.shape[1:] == shape:
            return x
        raise RequestError(400, f"inputs: expected one example of shape {list(shape)} or a list of them "
                                f"(shape [n, {', '.join(map(str, shape))}]), got shape {list(x.shape)}.")

    # ------------------------------------------------------------------------------------------- scoring

    def score(self, requests: Sequence[np.ndarray]) -> list[Any]:
        """Score the requests (each ``(n_i, *input_shape)``) together; per request a list of prediction rows,
        or a :class:`RequestError` for a request the model could not process. Blocking: run it in one
        worker thread."""
        with self._lock:
            if self.seed is not None:
                results = [self._score_alone(x) for x in requests]
            else:
                results = self._score_batched(list(requests))
            self._observe(requests, results)
            return results

    def warm_up(self) -> None:
        """Probe the strategy and run the scoring call once for each batch size the server will use (needs a
        known input shape); without a known shape this happens on the first requests of each size."""
        with self._lock:
            if self.input_shape is not None:
                for rows in ([1] if self.seed is not None else _buckets(self.max_batch)):
                    x = np.zeros((rows, *self.input_shape), dtype=self.input_dtype)
                    self._probe(x)
                    self._predict(x, self.seed, rows)  # the serving call itself (traced graphs, first chunks)
            self.ready = True

    def _probe(self, x: np.ndarray) -> None:
        key = str(len(x))
        if key in self.strategies:
            return
        _, info = mcu.sample(self.model, x, self.n_samples, seed=None if self.seed is None else 0,
                             strategy=self.strategy, return_info=True, **_sample_only(self.sample_options))
        self.strategies[key] = info.strategy
        self.backend = info.backend

    def _predict(self, x: np.ndarray, seed: int | None, batch_size: int) -> Any:
        return mcu.predict(self.model, x, self.n_samples, task=self.task, from_logits=self.from_logits, seed=seed,
                           strategy=self.strategy, batch_size=batch_size, **self.sample_options)

    def _score_alone(self, x: np.ndarray) -> Any:
        try:
            self._probe(x[:1])
            prediction = self._predict(x, self.seed, 1)
        except Exception as exc:  # noqa: BLE001 - the model refused this request's input
            return _model_error(x, exc)
        return self._rows(prediction, 0, len(x))

    def _score_batched(self, requests: list[np.ndarray]) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(requests):  # only examples of one shape can be stacked
            groups.setdefault((x.shape[1:], x.dtype.str), []).append(i)
        for members in groups.values():
            xs = [requests[i] for i in members]
            n = sum(len(x) for x in xs)
            rows = next((b for b in _buckets(self.max_batch) if b >= n), n)  # a few sizes: few auto probes
            stacked = np.concatenate(xs + [np.repeat(xs[0][:1], rows - n, axis=0)] if rows > n else xs)
            try:
                self._probe(stacked)
                prediction = self._predict(stacked, None, rows)
            except Exception:  # noqa: BLE001 - find the request the model refuses: score each alone
                for i in members:
                    results[i] = self._score_one_unseeded(requests[i])
                continue
            start = 0
            for i, x in zip(members, xs):
                results[i] = self._rows(prediction, start, start + len(x))
                start += len(x)
        return results

    def _score_one_unseeded(self, x: np.ndarray) -> Any:
        try:
            prediction = self._predict(x, None, len(x))
        except Exception as exc:  # noqa: BLE001 - the model refused this request's input
            return _model_error(x, exc)
        return self._rows(prediction, 0, len(x))

    def _rows(self, prediction: Any, start: int, stop: int) -> list[dict[str, Any]]:
        scores = self._scores(prediction)[start:stop]
        tiers = self.triage.route(scores).tolist() if self.triage is not None else [None] * (stop - start)
        if self.task == "classification":
            columns = {
                "label": prediction.label[start:stop].tolist(),
                "probabilities": prediction.mean[start:stop].tolist(),
                "predictive_entropy": prediction.predictive_entropy[start:stop].tolist(),
                "expected_entropy": prediction.expected_entropy[start:stop].tolist(),
                "mutual_information": prediction.mutual_information[start:stop].tolist(),
            }
            if self.score_name not in columns:
                columns[self.score_name] = scores.tolist()
        else:
            low, high = prediction.interval(self.interval_level)
            single = prediction.mean[0].size == 1
            pick = (lambda a: a[start:stop].reshape(stop - start).tolist()) if single else (
                lambda a: a[start:stop].tolist())
            columns = {"mean": pick(prediction.mean), "std": pick(prediction.std)}
            columns["interval"] = [list(pair) for pair in zip(pick(low), pick(high))]
        columns["tier"] = tiers
        names = list(columns)
        return [dict(zip(names, values)) for values in zip(*(columns[k] for k in names))]

    def _scores(self, prediction: Any) -> np.ndarray:
        if self.score_name == "std":
            std = np.asarray(prediction.std, dtype=np.float64)
            return std.reshape(len(std), -1).mean(axis=1)
        return np.asarray(getattr(prediction, self.score_name), dtype=np.float64)

    def _observe(self, requests: Sequence[np.ndarray], results: list[Any]) -> None:
        ok = [r for r in results if not isinstance(r, RequestError)]
        self.metrics.batch(n_requests=len(requests), n_examples=sum(len(x) for x in requests))
        rows = [row for result in ok for row in result]
        if not rows:
            return
        scores = np.array([float(np.mean(row[self.score_name])) for row in rows])  # regression std: over outputs
        self.metrics.examples([row["tier"] for row in rows], scores, self.score_name)
        if self.monitor is not None:
            before = len(self.monitor.checks)
            self.monitor.update(scores)
            for check in self.monitor.checks[before:]:
                self.metrics.drift(check)

    # --------------------------------------------------------------------------------------------- info

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` answers."""
        return {
            "model": self.name,
            "backend": self.backend,
            "task": self.task,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "input_dtype": self.input_dtype.name,
            "n_samples": self.n_samples,
            "strategy": self.strategy,
            "strategies_chosen": dict(sorted(self.strategies.items(), key=lambda kv: int(kv[0]))),
            "seed": self.seed,
            "batching": "per example (seeded)" if self.seed is not None else f"up to {self.max_batch} examples",
            "max_examples": self.max_examples,
            "score": self.score_name,
            "triage": None if self.triage is None else {
                "tiers": list(self.triage.tiers),
                "thresholds": [t if math.isfinite(t) else str(t) for t in self.triage.thresholds]},
            "drift": None if self.monitor is None else {
                "window": self.monitor.window, "alpha": self.monitor.alpha,
                "checks": len(self.monitor.checks), "alarms": len(self.monitor.alarms)},
        }


def _buckets(max_batch: int) -> list[int]:
    """Batch sizes the unseeded server pads to: powers of two below ``max_batch``, then ``max_batch``."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return sizes + [max_batch]


def _sample_only(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("chunk_size", "precision", "backend", "mode", "max_memory", "workers")
    return {k: v for k, v in options.items() if k in keys}


def _input_shape(model: Any, given: Sequence[int] | None) -> tuple[int, ...] | None:
    if given is not None:
        shape = tuple(given)
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise InputError(f"input_shape: expected positive integers (one example, no batch axis), got {given!r}.")
        return tuple(int(d) for d in shape)
    shape = getattr(model, "input_shape", None)  # Keras models know theirs: (None, *example)
    if isinstance(shape, tuple) and len(shape) >= 2 and all(isinstance(d, int) for d in shape[1:]):
        return tuple(shape[1:])
    return None


def _model_error(x: np.ndarray, exc: BaseException) -> RequestError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RequestError(400, f"inputs: the model cannot process examples of shape {list(x.shape[1:])} "
                             f"({type(exc).__name__}: {first[:300]}).")


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, list) and any(_has_bool(v) for v in value)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
