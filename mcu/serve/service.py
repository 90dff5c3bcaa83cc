"""The serving core, independent of the web framework: request checks, scoring a batch, triage, drift, metrics.

A :class:`Service` turns request bodies into input arrays, or named inputs for models that take several
(:meth:`Service.parse`, which raises a :class:`RequestError` naming the field), scores a list of requests in one call (:meth:`Service.score`,
run in ONE worker thread by the HTTP layer) and turns the results into JSON rows. The HTTP layer
(:mod:`mcu.serve.app`, :mod:`mcu.serve.ray_serve`) only reads bodies, batches requests and writes responses.

**Independence from the batch.** Without a seed, the examples of all coalesced requests with the same
signature (input names, per-example shapes and dtypes) are stacked into one :func:`mcu.predict` call (the fast strategies see ``N > 1``); every example gets its own dropout masks,
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
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

import mcu
from mcu.errors import InputError
from mcu.monitor import DriftMonitor
from mcu.structured import OUTPUT_HELP, rows, take_rows
from mcu.triage import Triage, load_thresholds

__all__ = ["RequestError", "Service", "load_reference", "save_reference"]

#: uncertainty scores a triage or the drift monitor may use, per task (higher = less certain)
SCORES = {
    "classification": ("predictive_entropy", "mutual_information", "expected_entropy", "variation_ratio"),
    "regression": ("std",),
}
REFERENCE_FORMAT = "mcu-drift-reference/1"
INPUT_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}

#: the examples of one request: one array ``(n, ...)``, or named inputs ``{name: (n, ...)}`` sharing ``n``
Inputs = np.ndarray | dict[str, np.ndarray]


class RequestError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}`` (the message names the field)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


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
            For a model taking named inputs, a mapping ``{name: shape}`` (declares the names, see below).
        input_dtype: ``"float32"``, ``"float64"``, ``"int32"`` or ``"int64"`` (token ids); for named inputs one
            of these for every input or a mapping ``{name: dtype}`` (declares the names). Default: ``float32``
            for an input array; for named inputs inferred from the JSON of each input (integers only:
            ``int64``, else ``float32``).
        output: what to sample when the model returns a structure (a Hugging Face ``ModelOutput``, a tuple,
            a dict): a key or attribute name (``"logits"``), an integer index, or a callable (see
            :func:`mcu.sample`).
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
        input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        input_dtype: str | Mapping[str, str] | None = None,
        output: Any = None,
        max_examples: int = 1024,
        max_batch: int = 64,
        name: str = "model",
        interval_level: float = 0.95,
        metrics: Any = None,
        **sample_options: Any,
    ) -> None:
        from mcu._checks import check_choice, check_int

        check_int(n_samples, "n_samples", minimum=1)
        check_choice(task, "task", tuple(SCORES))
        check_int(seed, "seed", minimum=0, allow_none=True)
        check_int(max_examples, "max_examples", minimum=1)
        check_int(max_batch, "max_batch", minimum=1)
        if not (output is None or callable(output) or (isinstance(output, (str, int)) and not isinstance(output, bool))):
            raise InputError(f"output: expected {OUTPUT_HELP}, got {output!r}.")
        if not isinstance(interval_level, numbers.Real) or not 0 < interval_level < 1:
            raise InputError(f"interval_level: expected a number in (0, 1), got {interval_level!r}.")
        self.model, self.n_samples, self.task, self.from_logits = model, int(n_samples), task, bool(from_logits)
        self.seed, self.strategy, self.name = seed, strategy, str(name)
        self.max_examples, self.max_batch, self.interval_level = int(max_examples), int(max_batch), interval_level
        self.output = output
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
        self.input_shape, self.input_dtype, self.input_names = _input_spec(model, input_shape, input_dtype)
        self.backend = mcu.backend_info(model)["selected"]
        if metrics is None:
            from mcu.serve.metrics import ServeMetrics

            metrics = ServeMetrics()
        self.metrics = metrics
        self.strategies: dict[str, str] = {}  # batch rows -> strategy chosen by auto (what /v1/model shows)
        self._lock = threading.Lock()  # one sampling call on the model at a time
        self.ready = False

    # ------------------------------------------------------------------------------------------ requests

    def parse(self, body: bytes) -> Inputs:
        """The examples of a ``POST /v1/predict`` body: ``(n, *input_shape)``, or for named inputs
        (``{"inputs": {"input_ids": [[...]], "attention_mask": [[...]]}}``) a dict of such arrays sharing ``n``.

        Raises:
            RequestError: 400 for a body that is not ``{"inputs": [...]}`` (or ``{"inputs": {name: [...]}}``)
                with finite numbers of one shape per input and one number of examples, 413 for more than
                ``max_examples`` examples.
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
        x = self._named(inputs, body) if isinstance(inputs, dict) else self._single(inputs, body)
        n = rows(x)
        if n > self.max_examples:
            raise RequestError(413, f"inputs: {n} examples in one request; the maximum is {self.max_examples}.")
        return x

    def _single(self, inputs: Any, body: bytes) -> np.ndarray:
        if self.input_names is not None:
            raise RequestError(400, f"inputs: expected named inputs, an object {{{', '.join(map(repr, self.input_names))}"
                                    f": [...]}}, got {_json_type(inputs)}.")
        _check_list(inputs, "inputs")
        x = _array(inputs, body, "inputs", self.input_dtype or np.dtype(np.float32))
        return _examples(x, self.input_shape, "inputs")

    def _named(self, inputs: dict, body: bytes) -> dict[str, np.ndarray]:
        """Named inputs: every value a list of examples (or one example when every value is one flat list)."""
        if self.input_names is None and self.input_shape is not None:
            raise RequestError(400, f"inputs: the model takes one input array of shape {list(self.input_shape)}; "
                                    "expected a list, got named inputs (a JSON object).")
        if not inputs:
            raise RequestError(400, "inputs: expected at least one named input, got an empty object.")
        if self.input_names is not None:
            missing = [k for k in self.input_names if k not in inputs]
            unknown = [k for k in inputs if k not in self.input_names]
            if missing or unknown:
                what = "; ".join(([f"missing {missing}"] if missing else [])
                                 + ([f"unexpected {unknown}"] if unknown else []))
                raise RequestError(400, f"inputs: {what}; expected the named inputs {list(self.input_names)}.")
        arrays = {}
        for name, value in inputs.items():
            field = f"inputs[{name!r}]"
            _check_list(value, field)
            dtype = self.input_dtype.get(name) if isinstance(self.input_dtype, dict) else self.input_dtype
            arrays[name] = _array(value, body, field, dtype)
        shapes = self.input_shape if isinstance(self.input_shape, dict) else {}
        if not shapes and all(a.ndim == 1 for a in arrays.values()):
            arrays = {k: a[None] for k, a in arrays.items()}  # one example given as flat lists
        x = {k: _examples(a, shapes.get(k), f"inputs[{k!r}]", flat_is_one=False) for k, a in arrays.items()}
        sizes = {k: len(a) for k, a in x.items()}
        if len(set(sizes.values())) != 1:
            raise RequestError(400, "inputs: every named input must hold the same number of examples; got "
                                    + ", ".join(f"{k}: {v}" for k, v in sizes.items()) + ".")
        return x

    # ------------------------------------------------------------------------------------------- scoring

    def score(self, requests: Sequence[Inputs]) -> list[Any]:
        """Score the requests (each ``(n_i, *input_shape)``, or named inputs) together; per request a list of prediction rows,
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
            if self._warm_input(1) is not None:
                for n in ([1] if self.seed is not None else _buckets(self.max_batch)):
                    x = self._warm_input(n)
                    self._probe(x)
                    self._predict(x, self.seed, n)  # the serving call itself (traced graphs, first chunks)
            self.ready = True

    def _warm_input(self, n: int) -> Inputs | None:
        """``n`` zero examples when every input's shape and dtype are known, else ``None``."""
        if self.input_names is None:
            return None if self.input_shape is None else np.zeros((n, *self.input_shape), self.input_dtype or np.float32)
        shapes, dtypes = self.input_shape, self.input_dtype
        if not isinstance(shapes, dict) or dtypes is None:
            return None
        return {k: np.zeros((n, *shapes[k]), dtypes[k] if isinstance(dtypes, dict) else dtypes)
                for k in self.input_names}

    def _probe(self, x: Inputs) -> None:
        key = str(rows(x))
        if key in self.strategies:
            return
        _, info = mcu.sample(self.model, x, self.n_samples, seed=None if self.seed is None else 0,
                             strategy=self.strategy, return_info=True, output=self.output,
                             **_sample_only(self.sample_options))
        self.strategies[key] = info.strategy
        self.backend = info.backend

    def _predict(self, x: Inputs, seed: int | None, batch_size: int) -> Any:
        return mcu.predict(self.model, x, self.n_samples, task=self.task, from_logits=self.from_logits, seed=seed,
                           strategy=self.strategy, batch_size=batch_size, output=self.output, **self.sample_options)

    def _score_alone(self, x: Inputs) -> Any:
        try:
            self._probe(take_rows(x, slice(0, 1)))
            prediction = self._predict(x, self.seed, 1)
        except Exception as exc:  # noqa: BLE001 - the model refused this request's input
            return _model_error(x, exc)
        return self._rows(prediction, 0, rows(x))

    def _score_batched(self, requests: list[Inputs]) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(requests):  # only requests with the same inputs, shapes and dtypes can be stacked
            groups.setdefault(_signature(x), []).append(i)
        for members in groups.values():
            xs = [requests[i] for i in members]
            n = sum(rows(x) for x in xs)
            padded = next((b for b in _buckets(self.max_batch) if b >= n), n)  # a few sizes: few auto probes
            stacked = _stack(xs, padded - n)
            try:
                self._probe(stacked)
                prediction = self._predict(stacked, None, padded)
            except Exception:  # noqa: BLE001 - find the request the model refuses: score each alone
                for i in members:
                    results[i] = self._score_one_unseeded(requests[i])
                continue
            start = 0
            for i, x in zip(members, xs):
                results[i] = self._rows(prediction, start, start + rows(x))
                start += rows(x)
        return results

    def _score_one_unseeded(self, x: Inputs) -> Any:
        try:
            prediction = self._predict(x, None, rows(x))
        except Exception as exc:  # noqa: BLE001 - the model refused this request's input
            return _model_error(x, exc)
        return self._rows(prediction, 0, rows(x))

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

    def _observe(self, requests: Sequence[Inputs], results: list[Any]) -> None:
        ok = [r for r in results if not isinstance(r, RequestError)]
        self.metrics.batch(n_requests=len(requests), n_examples=sum(rows(x) for x in requests))
        answered = [row for result in ok for row in result]
        if not answered:
            return
        scores = np.array([float(np.mean(row[self.score_name])) for row in answered])  # regression std: over outputs
        self.metrics.examples([row["tier"] for row in answered], scores, self.score_name)
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
            "input_shape": _describe(self.input_shape, list),
            "input_dtype": _describe(self.input_dtype, lambda d: d.name) or "float32 (named inputs: from the JSON)",
            "input_names": None if self.input_names is None else list(self.input_names),
            "output": self.output if self.output is None or isinstance(self.output, (str, int)) else repr(self.output),
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


def _input_shape(model: Any, given: Sequence[int] | None, argument: str = "input_shape") -> tuple[int, ...] | None:
    if given is not None:
        shape = tuple(given) if not isinstance(given, (str, bytes)) else (given,)
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise InputError(f"{argument}: expected positive integers (one example, no batch axis), got {given!r}.")
        return tuple(int(d) for d in shape)
    shape = getattr(model, "input_shape", None)  # Keras models know theirs: (None, *example)
    if isinstance(shape, tuple) and len(shape) >= 2 and all(isinstance(d, int) for d in shape[1:]):
        return tuple(shape[1:])
    return None


def _dtype(name: Any, argument: str) -> np.dtype:
    from mcu._checks import check_choice

    check_choice(name, argument, tuple(INPUT_DTYPES))
    return np.dtype(INPUT_DTYPES[name])


def _input_spec(model: Any, shape: Any, dtype: Any) -> tuple[Any, Any, tuple[str, ...] | None]:
    """``(input_shape, input_dtype, input_names)``: for one input array a shape (or ``None``) and a dtype; for
    declared named inputs (a mapping in ``input_shape`` or ``input_dtype``) mappings by name, and the names.
    An undeclared dtype stays ``None``: float32 for an array, inferred from the JSON for a named input."""
    names: list[tuple[str, ...]] = []
    for given, argument in ((shape, "input_shape"), (dtype, "input_dtype")):
        if isinstance(given, Mapping):
            if not given or not all(isinstance(k, str) for k in given):
                raise InputError(f"{argument}: expected a non-empty mapping from input names (strings), got "
                                 f"{given!r}.")
            names.append(tuple(given))
    if len(names) == 2 and set(names[0]) != set(names[1]):
        raise InputError(f"input_shape, input_dtype: name different inputs ({list(names[0])} and "
                         f"{list(names[1])}); expected the same names.")
    if isinstance(dtype, Mapping):
        dtype = {k: _dtype(v, f"input_dtype[{k!r}]") for k, v in dtype.items()}
    elif dtype is not None:
        dtype = _dtype(dtype, "input_dtype")
    if isinstance(shape, Mapping):
        shape = {k: _input_shape(None, v, f"input_shape[{k!r}]") for k, v in shape.items()}
    elif not names:
        return _input_shape(model, shape), dtype, None
    elif shape is not None:
        raise InputError(f"input_shape: expected a mapping {{name: shape}} for the named inputs of input_dtype, "
                         f"got {shape!r}.")
    return shape, dtype, names[0]


def _describe(value: Any, leaf: Any) -> Any:
    if value is None:
        return None
    return {k: leaf(v) for k, v in value.items()} if isinstance(value, dict) else leaf(value)


def _check_list(value: Any, field: str) -> None:
    if not isinstance(value, list):
        raise RequestError(400, f"{field}: expected a list (one example or a list of examples), got "
                                f"{_json_type(value)}.")
    if not value:
        raise RequestError(400, f"{field}: expected at least one example, got an empty list.")


def _array(inputs: list, body: bytes, field: str, dtype: np.dtype | None) -> np.ndarray:
    """A JSON list as an array of ``dtype`` (``None``: int64 for integers only, else float32), checked."""
    try:
        raw = np.asarray(inputs)
    except ValueError:
        raise RequestError(400, f"{field}: expected a rectangular nested list of numbers (every example of the "
                                "same shape), got lists of different lengths.") from None
    if raw.dtype.kind not in "iuf":
        kinds = {"U": "strings", "b": "booleans", "O": "null, mixed values, ragged lists or integers beyond 64 bits"}
        raise RequestError(400, f"{field}: expected numbers, got {kinds.get(raw.dtype.kind, raw.dtype.name)}.")
    if (b"true" in body or b"false" in body) and _has_bool(inputs):  # numpy turns [True, 2.0] into numbers
        raise RequestError(400, f"{field}: expected numbers, got a boolean (true/false).")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise RequestError(400, f"{field}: contains NaN or infinite values; expected finite numbers.")
    if dtype is None:
        dtype = np.dtype(np.int64 if raw.dtype.kind in "iu" else np.float32)
    if dtype.kind == "i":
        if raw.dtype.kind == "f":
            raise RequestError(400, f"{field}: expected integers (the model takes {dtype.name}), got numbers "
                                    "with a decimal point.")
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise RequestError(400, f"{field}: integers out of the {dtype.name} range.")
    elif raw.dtype.kind in "iu" and np.abs(raw).max(initial=0) > 2**53:
        raise RequestError(400, f"{field}: integers too large to be represented exactly as floats.")
    with np.errstate(over="ignore"):  # checked just below
        x = raw.astype(dtype, copy=False)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise RequestError(400, f"{field}: values beyond the {dtype.name} range.")
    return x


def _examples(x: np.ndarray, shape: tuple[int, ...] | None, field: str, flat_is_one: bool = True) -> np.ndarray:
    """One example or a list of examples -> ``(n, *shape)``."""
    if shape is None:
        return x[None] if x.ndim == 1 and flat_is_one else x  # a flat list is one example
    if x.shape == shape:
        return x[None]
    if x.shape[1:] == shape:
        return x
    raise RequestError(400, f"{field}: expected one example of shape {list(shape)} or a list of them "
                            f"(shape [n, {', '.join(map(str, shape))}]), got shape {list(x.shape)}.")


def _signature(x: Inputs) -> tuple:
    """Requests with the same signature can be concatenated along the batch axis: the same input names,
    per-example shapes and dtypes."""
    if isinstance(x, dict):
        return ("named", tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in x.items())))
    return ("array", x.shape[1:], x.dtype.str)


def _stack(xs: list[Inputs], pad: int) -> Inputs:
    """The requests' examples concatenated in order, then ``pad`` copies of the first example."""
    def join(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts + [np.repeat(parts[0][:1], pad, axis=0)] if pad else parts)

    if isinstance(xs[0], dict):
        return {k: join([x[k] for x in xs]) for k in xs[0]}
    return join(xs)


def _model_error(x: Inputs, exc: BaseException) -> RequestError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(x, dict):
        what = "named inputs of shapes " + ", ".join(f"{k}: {list(v.shape[1:])}" for k, v in x.items())
    else:
        what = f"examples of shape {list(x.shape[1:])}"
    return RequestError(400, f"inputs: the model cannot process {what} ({type(exc).__name__}: {first[:300]}).")


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, list) and any(_has_bool(v) for v in value)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
