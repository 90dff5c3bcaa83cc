"""``ActiveLearningLoop``: query, label, retrain, evaluate — resumable after a crash at any point.

The loop is framework-agnostic: it touches the model only through the user's ``retrain`` and ``evaluate``
callbacks and :func:`mcu.active.query`, so the same code drives a PyTorch or a Keras model.

**State machine.** Each round moves through three phases, and every transition is one atomic write of the
state file (temporary file in the same directory, ``fsync``, ``os.replace``)::

    query ──(pending = queried indices)──► label ──(labels recorded, none pending)──► train ──► query

* ``query``: the model scores the unlabeled pool; the chosen indices are saved as *pending* before anyone
  is asked for a label.
* ``label``: the oracle is asked for the pending indices that have no label yet. Its answer is recorded in
  the same write that ends the phase, keyed by pool index: a label is either saved or not, never twice.
* ``train``: ``retrain(labeled_indices, labels)``, then ``evaluate(model)``; the round is appended to the
  history and the stopping rules are checked.

A process killed anywhere restarts from the last saved phase: killed before the oracle's answer is saved,
the restarted loop asks again for exactly the pending items still unlabeled (an exported file can simply be
imported again: importing a label already recorded is a no-op); killed during training, it retrains. Round
0 evaluates the starting model (trained on the initial labels) so the learning curve has its first point.
Models are never saved: on resume the loop rebuilds the model with ``retrain`` on the saved labels.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mcu._checks import check_choice, check_int, check_number, fail
from mcu._seeds import derive_seed
from mcu.active._pool import iter_chunks, pool_length, take
from mcu.active.acquisition import get_heuristic
from mcu.active.querying import query
from mcu.core.sampling import MAX_SEED
from mcu.errors import InputError

__all__ = ["ActiveLearningLoop", "plot_history"]

_FORMAT = "mcu.active.loop/1"
_PHASES = ("query", "label", "train", "stopped")
_MODES = ("max", "min")
#: What ``query_options`` may set; the loop itself chooses the model, k, heuristic, seed and subset.
_QUERY_OPTIONS = ("n_samples", "batch_size", "from_logits", "backend", "progress", "n_candidates")


class ActiveLearningLoop:
    """Pool-based active learning with MC-dropout acquisition, a label budget and early stopping.

    Args:
        pool: the unlabeled pool (any container :func:`mcu.active.query` accepts); indices are positions in it.
        retrain: ``retrain(labeled_indices, labels) -> model``: train a model from scratch (or fine-tune) on
            the labeled pool items; ``labels`` is a numpy array aligned with the indices.
        evaluate: ``evaluate(model) -> float``: the validation metric of the learning curve.
        state_path: JSON file holding the loop's state; if it exists, the loop resumes from it: the initial
            labels are then ignored, and so is ``model`` once round 0 is finished (the model is rebuilt
            with ``retrain`` on the saved labels). Budget and patience are re-checked with the new values.
        query_size: examples queried per round (the last round may ask fewer, to respect ``budget``).
        oracle: ``oracle(indices) -> labels`` (one label per index, JSON-serialisable: int, float, str,
            lists or numpy scalars/arrays). ``None`` to work through files: each round writes the queried
            items to ``export_path`` and :meth:`run` returns until :meth:`import_labels` is called.
        export_path: ``.csv`` or ``.json`` file for annotators (required when ``oracle`` is ``None``).
        initial_indices, initial_labels: the labeled starting set (pool indices and their labels).
        model: a model already trained on the initial set; default: ``retrain`` on it.
        budget: maximum number of labels the loop asks for (the initial labels do not count).
        patience: stop after this many rounds without an improvement of more than ``min_delta``.
        min_delta: the smallest change of the metric that counts as an improvement.
        mode: ``"max"`` if a higher metric is better (accuracy), ``"min"`` if lower is better (a loss).
        heuristic: acquisition heuristic (see :data:`mcu.active.acquisition.HEURISTICS`).
        seed: seeds each round's query (round ``r`` uses a seed derived from ``seed`` and ``r``).
        query_options: more keyword arguments for :func:`mcu.active.query` (``n_samples``, ``batch_size``,
            ``from_logits``, ``backend``, ``progress``, ``n_candidates``). The queries show no progress bar
            unless ``progress`` is given here or ``MCU_PROGRESS`` is set.

    Example:
        >>> loop = ActiveLearningLoop(                                      # doctest: +SKIP
        ...     x_pool, retrain=fit, evaluate=val_accuracy, state_path="al/state.json",
        ...     query_size=20, oracle=lambda idx: y_pool[idx], initial_indices=seed_idx,
        ...     initial_labels=y_pool[seed_idx], budget=200, patience=3)
        >>> history = loop.run()                                            # doctest: +SKIP
        >>> loop.plot_history(path="al/curve.png")                          # doctest: +SKIP
    """

    def __init__(
        self,
        pool: Any,
        *,
        retrain: Callable[[np.ndarray, np.ndarray], Any],
        evaluate: Callable[[Any], float],
        state_path: str | os.PathLike,
        query_size: int,
        oracle: Callable[[np.ndarray], Sequence[Any]] | None = None,
        export_path: str | os.PathLike | None = None,
        initial_indices: Iterable[int] = (),
        initial_labels: Iterable[Any] = (),
        model: Any = None,
        budget: int | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
        mode: str = "max",
        heuristic: str = "bald",
        seed: int | None = None,
        query_options: dict[str, Any] | None = None,
    ) -> None:
        check_int(query_size, "query_size", minimum=1)
        check_int(budget, "budget", minimum=0, allow_none=True)
        check_int(patience, "patience", minimum=1, allow_none=True)
        check_int(seed, "seed", minimum=0, maximum=MAX_SEED, allow_none=True)
        check_number(min_delta, "min_delta", minimum=0)
        for name, callback in (("retrain", retrain), ("evaluate", evaluate), ("oracle", oracle)):
            if not callable(callback) and not (name == "oracle" and callback is None):
                raise fail(name, "a callable" + (" or None" if name == "oracle" else ""), repr(callback))
        for name, path in (("state_path", state_path), ("export_path", export_path)):
            if not isinstance(path, (str, os.PathLike)) and not (name == "export_path" and path is None):
                raise fail(name, "a file path (str or os.PathLike)", repr(path))
        get_heuristic(heuristic)
        check_choice(mode, "mode", _MODES)  # "max": a higher metric is better
        if oracle is None and export_path is None:
            raise InputError(
                "oracle: got None and no export_path; expected a callback oracle(indices) -> labels or an export_path."
            )
        if export_path is not None and Path(export_path).suffix.lower() not in (".csv", ".json"):
            raise InputError(f"export_path: expected a .csv or .json file, got {str(export_path)!r}.")
        self.pool, self.retrain, self.evaluate, self.oracle = pool, retrain, evaluate, oracle
        self.state_path = Path(state_path)
        self.export_path = None if export_path is None else Path(export_path)
        self.query_size, self.budget, self.patience = query_size, budget, patience
        self.min_delta, self.mode = float(min_delta), mode
        self.heuristic, self.seed, self.query_options = heuristic, seed, _query_options(query_options)
        for stale in self.state_path.parent.glob(f".{self.state_path.name}.*.tmp"):  # left by a killed save
            stale.unlink(missing_ok=True)
        if self.state_path.exists():
            self.state = _load_state(self.state_path, _pool_size(pool))
        else:
            self.state = _new_state(_pool_size(pool), initial_indices, initial_labels)
            if model is None and not self.state["labeled"]:
                raise InputError("initial_indices: got no labeled examples and no model; expected one or the other.")
            self._save()
        self.model = model if not self.state["history"] else None  # trained on the initial set only

    # -- views of the state -------------------------------------------------------------------------------

    @property
    def labeled_indices(self) -> np.ndarray:
        """Pool indices with a label, in the order they were labeled."""
        return np.array([i for i, _ in self.state["labeled"]], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """The labels, aligned with :attr:`labeled_indices`."""
        return np.asarray([label for _, label in self.state["labeled"]])

    @property
    def unlabeled_indices(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.state["pool_size"]), self.labeled_indices)

    @property
    def pending_indices(self) -> np.ndarray:
        """Queried indices still waiting for a label."""
        pending = self.state["pending"]
        labeled = set(self.labeled_indices.tolist())
        return np.array([] if pending is None else [i for i in pending["indices"] if i not in labeled], dtype=np.int64)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per finished round: ``round``, ``n_labeled``, ``metric``, ``seconds``, ``queried``, ``scores``."""
        return self.state["history"]

    @property
    def stopped(self) -> str | None:
        """Why the loop stopped (``"budget"``, ``"plateau"``, ``"pool exhausted"``), or ``None``."""
        return self.state["stopped"]

    @property
    def waiting_for_labels(self) -> bool:
        """Whether queried items were exported and the loop waits for :meth:`import_labels`."""
        return self.state["phase"] == "label" and self.oracle is None

    @property
    def n_queried(self) -> int:
        """Labels obtained by the loop (the initial ones excluded)."""
        return len(self.state["labeled"]) - self.state["n_initial"]

    # -- running ------------------------------------------------------------------------------------------

    def run(self, max_rounds: int | None = None) -> list[dict[str, Any]]:
        """Run rounds until a stopping rule fires, ``max_rounds`` rounds finish, or labels must be imported.

        Returns:
            The history (see :attr:`history`).
        """
        check_int(max_rounds, "max_rounds", minimum=1, allow_none=True)
        finished = 0
        while max_rounds is None or finished < max_rounds:
            if self.step() is None:
                break
            finished += 1
        return self.history

    def step(self) -> dict[str, Any] | None:
        """Advance until the current round finishes; its history record, or ``None`` if waiting or stopped."""
        rounds = len(self.history)
        while len(self.history) == rounds:
            phase = self.state["phase"]
            if phase in ("query", "stopped"):  # a stopped loop reopens if a new budget/patience allows
                if self._stop_if_done():
                    return None
                self._query()
            elif phase == "label":
                if not self._ask_oracle():
                    return None
            else:
                self._train()
        return self.history[-1]

    def import_labels(self, path: str | os.PathLike) -> int:
        """Record annotator labels from a ``.csv`` (columns ``index``, ``label``) or ``.json`` file.

        CSV labels are read as ``int`` when possible, else ``float``, else ``str``; empty cells are skipped,
        so a partly labeled file can be imported and completed later. JSON is the exported structure with
        ``label`` filled in, or a mapping ``{"index": label}``. Importing a label already recorded is a no-op.

        Returns:
            The number of new labels recorded.
        """
        pairs = _read_labels(Path(path))
        return self._record(pairs)

    def plot_history(self, **kwargs: Any) -> Any:
        """The learning curve of this loop; see :func:`plot_history`."""
        return plot_history(self.history, **kwargs)

    def save_history(self, path: str | os.PathLike) -> None:
        """Write the history as JSON (atomically)."""
        _write_atomic(Path(path), json.dumps(self.history, indent=1).encode())

    # -- phases -------------------------------------------------------------------------------------------

    def _query(self) -> None:
        start = time.perf_counter()
        unlabeled = self.unlabeled_indices
        k = min(self.query_size, len(unlabeled), math.inf if self.budget is None else self.budget - self.n_queried)
        round_ = len(self.history)
        from mcu.core.progress import env_progress

        # a bar per round's query only when asked for (query_options or MCU_PROGRESS): rounds are many
        options = {"progress": env_progress() or False, **self.query_options}
        indices, scores = query(
            self._current_model(), self.pool, int(k), heuristic=self.heuristic, seed=derive_seed(self.seed, round_),
            subset=unlabeled, **options,
        )
        pending = {"round": round_, "indices": indices.tolist(), "scores": scores.tolist()}
        self.state.update(phase="label", stopped=None, pending=pending)
        self._charge(start)
        self._save()

    def _ask_oracle(self) -> bool:
        """Get labels for the pending items; ``False`` when they were exported and must be imported."""
        asked = self.pending_indices
        if self.oracle is None:
            self._export(asked)
            return False
        start = time.perf_counter()
        labels = _oracle_labels(self.oracle(asked.copy()), asked)
        self._charge(start)
        self._record(zip(asked.tolist(), labels))
        return True

    def _record(self, pairs: Iterable[tuple[int, Any]]) -> int:
        """Add labels of pending items, end the label phase when none is missing; one atomic save."""
        known = dict(self.state["labeled"])
        pending = set(self.pending_indices.tolist())
        new = []
        for index, label in pairs:
            index, label = int(index), _jsonable(label)
            if index in known:
                if known[index] != label:
                    raise InputError(f"labels: index {index} is already labeled {known[index]!r}; got {label!r}.")
                continue
            if index not in pending:
                raise InputError(
                    f"labels: index {index} was not queried; expected one of the pending {sorted(pending)}."
                )
            known[index] = label
            new.append([index, label])
        self.state["labeled"].extend(new)
        if self.state["phase"] == "label" and len(self.pending_indices) == 0:
            self.state["phase"] = "train"
        self._save()
        return len(new)

    def _train(self) -> None:
        start = time.perf_counter()
        if self.history or self.model is None:  # round 0 uses the starting model when one was given
            self.model = self.retrain(self.labeled_indices, self.labels)
        metric = _finite(self.evaluate(self.model))
        self._charge(start)
        pending = self.state["pending"] or {"indices": [], "scores": []}
        self.history.append({
            "round": len(self.history), "n_labeled": len(self.state["labeled"]), "metric": metric,
            "seconds": self.state["seconds"], "queried": pending["indices"], "scores": pending["scores"],
        })
        self._update_plateau(metric)
        self.state.update(pending=None, seconds=0.0, phase="query")
        if not self._stop_if_done():
            self._save()

    def _current_model(self) -> Any:
        if self.model is None:  # resumed: rebuild from the saved labels
            self.model = self.retrain(self.labeled_indices, self.labels)
        return self.model

    def _update_plateau(self, metric: float) -> None:
        best = self.state["best"]
        gain = math.inf if best is None else (metric - best if self.mode == "max" else best - metric)
        if gain > self.min_delta:
            self.state.update(best=metric, stale_rounds=0)
        else:
            self.state["stale_rounds"] += 1

    def _stop_if_done(self) -> bool:
        """Check the stopping rules (with the current arguments); on a stop, record the reason and save."""
        reason = self._stop_reason()
        if reason is not None and (self.state["phase"], self.state["stopped"]) != ("stopped", reason):
            self.state.update(phase="stopped", stopped=reason)
            self._save()
        return reason is not None

    def _stop_reason(self) -> str | None:
        if self.budget is not None and self.n_queried >= self.budget:
            return "budget"
        if len(self.unlabeled_indices) == 0:
            return "pool exhausted"
        if self.patience is not None and self.state["stale_rounds"] >= self.patience:
            return "plateau"
        return None

    def _charge(self, start: float) -> None:
        """Add the time since ``start`` to the current round (summed across restarts)."""
        self.state["seconds"] += time.perf_counter() - start

    def _export(self, indices: np.ndarray) -> None:
        """Write the pending items for annotators, with their features in ``<name>.features.npy`` beside."""
        assert self.export_path is not None
        pending = self.state["pending"]
        scores = dict(zip(pending["indices"], pending["scores"]))
        features_path = self.export_path.with_suffix(".features.npy")
        buffer = io.BytesIO()
        np.save(buffer, take(self.pool, indices.tolist()) if len(indices) else np.empty((0,)))
        _write_atomic(features_path, buffer.getvalue())
        rows = [
            {"index": int(i), "score": scores[int(i)], "features_file": features_path.name, "features_row": row,
             "label": None}
            for row, i in enumerate(indices)
        ]
        _write_atomic(self.export_path, _format_export(rows, pending["round"], self.export_path.suffix.lower()))

    def _save(self) -> None:
        _write_atomic(self.state_path, json.dumps(self.state).encode())


# -- state file -----------------------------------------------------------------------------------------------


def _pool_size(pool: Any) -> int:
    n = pool_length(pool)
    return n if n is not None else sum(len(indices) for indices, _ in iter_chunks(pool, 1024))


def _new_state(pool_size: int, initial_indices: Iterable[int], initial_labels: Iterable[Any]) -> dict[str, Any]:
    indices, labels = _listed(initial_indices, "initial_indices"), _listed(initial_labels, "initial_labels")
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_)) for i in indices):
        raise fail("initial_indices", "integer pool indices", repr(indices))
    indices, labels = [int(i) for i in indices], [_jsonable(label) for label in labels]
    if len(indices) != len(labels):
        raise InputError(f"initial_labels: expected {len(indices)} labels (one per initial index), got {len(labels)}.")
    if len(set(indices)) != len(indices) or any(not 0 <= i < pool_size for i in indices):
        raise InputError(f"initial_indices: expected distinct pool indices in [0, {pool_size}), got {indices}.")
    return {
        "format": _FORMAT, "pool_size": pool_size, "n_initial": len(indices),
        "labeled": [[i, label] for i, label in zip(indices, labels)],
        "phase": "train", "pending": None, "history": [], "best": None, "stale_rounds": 0,
        "stopped": None, "seconds": 0.0,
    }


def _listed(values: Any, argument: str) -> list[Any]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise fail(argument, "a sequence", repr(values))
    return list(values)


def _query_options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is not None and not isinstance(options, dict):
        raise fail("query_options", "a dict of mcu.active.query keyword arguments or None", repr(options))
    options = dict(options or {})
    unknown = set(options) - set(_QUERY_OPTIONS)
    if unknown:
        raise InputError(f"query_options: got {sorted(unknown)}; expected keys among {list(_QUERY_OPTIONS)}.")
    return options


def _load_state(path: Path, pool_size: int) -> dict[str, Any]:
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"state_path: {str(path)!r} is not valid JSON ({exc}); expected a loop state file.") from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("phase") not in _PHASES:
        raise InputError(f"state_path: {str(path)!r} is not an ActiveLearningLoop state file ({_FORMAT}).")
    _check_state(state, path)
    if state["pool_size"] != pool_size:
        raise InputError(
            f"pool: the state in {str(path)!r} belongs to a pool of {state['pool_size']} examples, got {pool_size}; "
            "expected the same pool (or a new state_path)."
        )
    return state


_STATE_KEYS = {"pool_size": int, "n_initial": int, "labeled": list, "history": list, "stale_rounds": int,
               "seconds": (int, float)}


def _check_state(state: dict[str, Any], path: Path) -> None:
    """Raise unless the state's fields have their types and every index is a distinct position in the pool."""
    def bad(what: str) -> InputError:
        return InputError(f"state_path: {str(path)!r} is not a consistent ActiveLearningLoop state file: {what}.")

    for key, kind in _STATE_KEYS.items():
        if key not in state or isinstance(state[key], bool) or not isinstance(state[key], kind):
            raise bad(f"field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    for key in ("pending", "best", "stopped"):
        if key not in state:
            raise bad(f"field {key!r} is missing")
    n = state["pool_size"]
    labeled = state["labeled"]
    if not all(isinstance(p, list) and len(p) == 2 and _is_index(p[0], n) for p in labeled):
        raise bad(f"'labeled' must hold [index, label] pairs with indices in [0, {n})")
    if len({p[0] for p in labeled}) != len(labeled) or not 0 <= state["n_initial"] <= len(labeled):
        raise bad("'labeled' holds an index twice, or 'n_initial' exceeds it")
    pending = state["pending"]
    if pending is not None and not (isinstance(pending, dict) and isinstance(pending.get("indices"), list)
                                    and isinstance(pending.get("scores"), list)
                                    and all(_is_index(i, n) for i in pending["indices"])):
        raise bad(f"'pending' must hold 'indices' in [0, {n}) and 'scores'")


def _is_index(value: Any, n: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n


def _oracle_labels(answer: Any, asked: np.ndarray) -> list[Any]:
    """The oracle's answer as one label per asked index, in order; ``InputError`` for anything else."""
    if answer is None or isinstance(answer, (str, bytes, dict, set, frozenset)) or not hasattr(answer, "__iter__"):
        shown = type(answer).__qualname__ if answer is not None else "None"
        hint = " (a mapping: return [labels[i] for i in indices])" if isinstance(answer, dict) else ""
        raise InputError(f"oracle: expected a sequence of {len(asked)} labels aligned with the indices, "
                         f"got {shown}{hint}.")
    labels = list(answer)
    if len(labels) != len(asked):
        raise InputError(f"oracle: expected {len(asked)} labels (one per index), got {len(labels)}.")
    missing = [int(i) for i, label in zip(asked, labels) if label is None]
    if missing:
        raise InputError(f"oracle: expected a label for every index, got None for indices {missing[:10]}.")
    return labels


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves either the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _jsonable(label: Any) -> Any:
    """A label as plain JSON data (numpy scalars and arrays converted); ``InputError`` if impossible."""
    if isinstance(label, (np.ndarray, np.generic)):
        label = label.tolist()
    try:
        return json.loads(json.dumps(label))
    except (TypeError, ValueError):
        raise InputError(
            f"labels: expected JSON-serialisable labels (int, float, str, lists), got {label!r}."
        ) from None


def _finite(metric: Any) -> float:
    try:
        value = None if isinstance(metric, (str, bytes, bool)) else float(metric)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value):
        raise InputError(f"evaluate: expected the callback to return a finite number, got {metric!r}.")
    return value


# -- annotator files ------------------------------------------------------------------------------------------


def _format_export(rows: list[dict[str, Any]], round_: int, suffix: str) -> bytes:
    if suffix == ".json":
        return json.dumps({"round": round_, "items": rows}, indent=1).encode()
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["index", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows([{**row, "label": ""} for row in rows])
    return out.getvalue().encode()


def _read_labels(path: Path) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise InputError(f"path: expected a .csv or .json labels file, got {str(path)!r}.")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"path: expected a readable UTF-8 {suffix} labels file, got {str(path)!r} ({exc}).") from exc
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        if rows and not {"index", "label"} <= set(rows[0]):
            raise InputError(f"path: expected CSV columns 'index' and 'label' in {str(path)!r}, got {sorted(rows[0])}.")
        return [(_index(row["index"], path, line), _parse_cell(row["label"]))
                for line, row in enumerate(rows, start=2) if (row["label"] or "").strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"path: {str(path)!r} is not valid JSON ({exc}); expected the exported labels file.") from exc
    if isinstance(data, dict) and "items" in data and isinstance(data["items"], list):
        items = data["items"]
        if not all(isinstance(item, dict) and "index" in item for item in items):
            raise InputError(f"path: expected every item of {str(path)!r} to be an object with an 'index'.")
        return [(_index(item["index"], path), item["label"]) for item in items if item.get("label") is not None]
    if isinstance(data, dict):
        return [(_index(index, path), label) for index, label in data.items() if label is not None]
    raise InputError(f"path: expected the exported structure or a mapping {{index: label}} in {str(path)!r}, "
                     f"got a JSON {type(data).__name__}.")


def _index(value: Any, path: Path, line: int | None = None) -> int:
    """A pool index read from a labels file: an int, or a string of decimal digits (no "3.0", no "1e3")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value.strip())
    where = f" (line {line})" if line is not None else ""
    raise InputError(f"path: expected integer pool indices in {str(path)!r}{where}, got index {value!r}.")


def _parse_cell(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text.strip()


# -- learning curve -------------------------------------------------------------------------------------------


def plot_history(history: Sequence[dict[str, Any]], *, ax: Any = None, path: str | os.PathLike | None = None,
                 label: str | None = None, metric_name: str = "validation metric") -> Any:
    """Plot a learning curve: the metric against the number of labeled examples (matplotlib, imported here).

    Args:
        history: :attr:`ActiveLearningLoop.history`, or the list loaded from a saved history JSON.
        ax: axes to draw on (several loops/heuristics on one plot); default: a new figure.
        path: also save the figure there.
        label: legend label of the curve.
        metric_name: y-axis label.

    Returns:
        The matplotlib ``Axes``.

    Example:
        >>> ax = plot_history([{"n_labeled": 10, "metric": 0.6}, {"n_labeled": 30, "metric": 0.8}])  # doctest: +SKIP
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError('plot_history needs matplotlib: pip install "mcu[plot]"') from exc
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["n_labeled"] for r in history], [r["metric"] for r in history], marker="o", label=label)
    ax.set_xlabel("labeled examples")
    ax.set_ylabel(metric_name)
    ax.grid(True, alpha=0.3)
    if label is not None:
        ax.legend()
    if path is not None:
        ax.figure.savefig(path, bbox_inches="tight")
    return ax
