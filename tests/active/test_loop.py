"""``ActiveLearningLoop``: bookkeeping, stopping rules, oracle files, history, and crash-safe resume."""

from __future__ import annotations

import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mcu.active import ActiveLearningLoop, plot_history
from mcu.errors import InputError

loop_module = importlib.import_module("mcu.active.loop")
REPO = Path(__file__).resolve().parents[2]

N_POOL = 60
POOL = np.arange(N_POOL, dtype=np.float32).reshape(N_POOL, 1) / N_POOL
TRUTH = (np.arange(N_POOL) * 7) % 3  # the oracle's answers


def fake_query(model, pool, k, *, heuristic, seed, subset, **options):
    """Deterministic stand-in for mcu.active.query: scores depend on the model, so they change per round."""
    subset = np.asarray(subset)
    scores = ((subset * 7919 + model["n"] * 31) % 1000) / 1000.0
    order = np.lexsort((subset, -scores))[:k]
    return subset[order], scores[order]


def retrain(indices, labels):
    assert len(indices) == len(labels) == len(set(indices.tolist()))
    np.testing.assert_array_equal(labels, TRUTH[indices])  # every label reached training, correctly
    return {"n": len(indices)}


def accuracy_curve(model):
    return min(1.0, 0.5 + model["n"] / 100)


class Oracle:
    """Answers with TRUTH and remembers what it was asked."""

    def __init__(self):
        self.asked: list[list[int]] = []

    def __call__(self, indices):
        self.asked.append(indices.tolist())
        return TRUTH[indices]


def loop_kwargs(state_path, **overrides):
    kwargs = dict(
        retrain=retrain, evaluate=accuracy_curve, state_path=state_path, query_size=5, oracle=Oracle(),
        initial_indices=[0, 1, 2], initial_labels=TRUTH[[0, 1, 2]], budget=17, seed=0,
    )
    return {**kwargs, **overrides}


@pytest.fixture(autouse=True)
def no_framework_query(monkeypatch):
    monkeypatch.setattr(loop_module, "query", fake_query)


def outcome(loop):
    """What must not depend on crashes: the labels, in order, and the per-round record minus the timing."""
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in loop.history]
    return loop.state["labeled"], rounds, loop.stopped


def reference(tmp_path, **overrides):
    loop = ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "reference" / "state.json", **overrides))
    loop.run()
    return outcome(loop)


# -- bookkeeping and stopping rules -----------------------------------------------------------------------------


def test_budget_is_spent_exactly_and_every_label_is_kept_once(tmp_path):
    oracle = Oracle()
    loop = ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json", oracle=oracle))
    history = loop.run()
    assert loop.stopped == "budget"
    assert [len(q) for q in oracle.asked] == [5, 5, 5, 2]  # the last round asks only what the budget allows
    assert loop.n_queried == 17
    assert [r["n_labeled"] for r in history] == [3, 8, 13, 18, 20]
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert history[0]["queried"] == []
    indices = loop.labeled_indices
    assert len(set(indices.tolist())) == 20
    np.testing.assert_array_equal(loop.labels, TRUTH[indices])
    assert sorted(np.r_[indices, loop.unlabeled_indices].tolist()) == list(range(N_POOL))
    assert all(r["seconds"] >= 0 for r in history)
    assert all(np.all(np.diff(r["scores"]) <= 0) for r in history)


def test_plateau_stops_after_patience_rounds_without_min_delta_gain(tmp_path):
    metrics = iter([0.50, 0.60, 0.605, 0.609, 0.70])
    loop = ActiveLearningLoop(POOL, **loop_kwargs(
        tmp_path / "s.json", evaluate=lambda model: next(metrics), budget=None, patience=2, min_delta=0.01))
    history = loop.run()
    assert loop.stopped == "plateau"
    assert [r["metric"] for r in history] == [0.50, 0.60, 0.605, 0.609]


def test_plateau_in_min_mode_for_a_loss(tmp_path):
    losses = iter([1.0, 0.8, 0.85, 0.9])
    loop = ActiveLearningLoop(POOL, **loop_kwargs(
        tmp_path / "s.json", evaluate=lambda model: next(losses), budget=None, patience=2, mode="min"))
    assert len(loop.run()) == 4 and loop.stopped == "plateau"


def test_pool_exhausted(tmp_path):
    loop = ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json", query_size=25, budget=None))
    loop.run()
    assert loop.stopped == "pool exhausted"
    assert len(loop.labeled_indices) == N_POOL


def test_max_rounds_pauses_and_run_continues(tmp_path):
    loop = ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json"))
    assert len(loop.run(max_rounds=2)) == 2 and loop.stopped is None
    loop.run()
    assert outcome(loop) == reference(tmp_path)


def test_a_starting_model_is_used_for_round_zero(tmp_path):
    calls = []
    loop = ActiveLearningLoop(POOL, **loop_kwargs(
        tmp_path / "s.json", model={"n": 3}, retrain=lambda i, y: calls.append(len(i)) or {"n": len(i)}))
    loop.run(max_rounds=2)
    assert calls == [8]  # round 0 evaluated the given model; round 1 retrained on 3 + 5 labels


def test_a_larger_budget_on_restart_reopens_a_stopped_loop(tmp_path):
    path = tmp_path / "s.json"
    ActiveLearningLoop(POOL, **loop_kwargs(path, budget=5)).run()
    loop = ActiveLearningLoop(POOL, **loop_kwargs(path, budget=10))
    loop.run()
    assert loop.stopped == "budget" and loop.n_queried == 10


def test_invalid_arguments(tmp_path):
    with pytest.raises(InputError, match="oracle"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "a.json", oracle=None))
    with pytest.raises(InputError, match="export_path"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "b.json", oracle=None, export_path=tmp_path / "x.txt"))
    with pytest.raises(InputError, match="mode"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "c.json", mode="maximize"))
    with pytest.raises(InputError, match="initial_indices"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "d.json", initial_indices=[0, 0], initial_labels=[1, 1]))
    with pytest.raises(InputError, match="no labeled examples and no model"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "e.json", initial_indices=[], initial_labels=[]))
    with pytest.raises(InputError, match="heuristic"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "f.json", heuristic="nope"))
    with pytest.raises(InputError, match="query_options: got \\['seed'\\]"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "g.json", query_options={"seed": 1}))
    (tmp_path / "h.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "h.json"))


def test_state_of_another_pool_is_rejected(tmp_path):
    ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json"))
    with pytest.raises(InputError, match="pool of 60 examples, got 59"):
        ActiveLearningLoop(POOL[:59], **loop_kwargs(tmp_path / "s.json"))


def test_wrong_number_of_oracle_labels_is_rejected(tmp_path):
    loop = ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json", oracle=lambda idx: [0]))
    with pytest.raises(InputError, match="oracle: expected 5 labels"):
        loop.run()


# -- crash safety ---------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for the process dying: nothing after the raise runs."""


def test_a_crash_at_any_state_save_loses_and_duplicates_no_label(tmp_path, monkeypatch):
    expected = reference(tmp_path)
    real_write = loop_module._write_atomic
    saves = []
    monkeypatch.setattr(loop_module, "_write_atomic", lambda path, data: saves.append(path) or real_write(path, data))
    ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "count" / "state.json")).run()
    n_saves = len(saves)
    assert n_saves == 1 + 1 + 3 * 4  # create, round 0, (query, label, train) x 4 rounds (the last one stops)

    for crash_at in range(1, n_saves + 1):
        path = tmp_path / f"crash{crash_at}" / "state.json"
        count = [0]

        def write_or_die(target, data, crash_at=crash_at, count=count):
            count[0] += 1
            if count[0] == crash_at:
                raise Killed(f"killed before save {crash_at}")
            real_write(target, data)

        monkeypatch.setattr(loop_module, "_write_atomic", write_or_die)
        with pytest.raises(Killed):
            ActiveLearningLoop(POOL, **loop_kwargs(path)).run()
        monkeypatch.setattr(loop_module, "_write_atomic", real_write)
        oracle = Oracle()
        resumed = ActiveLearningLoop(POOL, **loop_kwargs(path, oracle=oracle))
        resumed.run()
        assert outcome(resumed) == expected, f"crash before save {crash_at}"
        asked = [i for batch in oracle.asked for i in batch]
        assert len(asked) == len(set(asked)), "the restarted loop asked for an index twice"
        assert not set(asked) & {0, 1, 2}  # initial labels are never asked for


def test_an_oracle_failing_mid_run_is_asked_again_only_for_the_pending_items(tmp_path):
    path = tmp_path / "s.json"

    def flaky(indices):
        if len(flaky.calls) == 2:
            raise ConnectionError("annotation service down")
        flaky.calls.append(indices.tolist())
        return TRUTH[indices]

    flaky.calls = []
    with pytest.raises(ConnectionError):
        ActiveLearningLoop(POOL, **loop_kwargs(path, oracle=flaky)).run()
    pending = ActiveLearningLoop(POOL, **loop_kwargs(path)).pending_indices.tolist()
    assert len(pending) == 5
    oracle = Oracle()
    resumed = ActiveLearningLoop(POOL, **loop_kwargs(path, oracle=oracle))
    resumed.run()
    assert oracle.asked[0] == pending
    assert outcome(resumed) == reference(tmp_path)


SIGKILL_SCRIPT = textwrap.dedent(
    """
    import importlib, os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.active import test_loop as t
    loop_module = importlib.import_module("mcu.active.loop")
    loop_module.query = t.fake_query
    kill_at, count, real_replace = int(sys.argv[2]), [0], os.replace

    def replace(src, dst):  # the temp file is written and fsynced; die before it replaces the state
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace
    t.ActiveLearningLoop(t.POOL, **t.loop_kwargs(sys.argv[1])).run()
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("kill_at", [4, 5], ids=["after-oracle-answer", "training"])
def test_sigkill_then_restart_keeps_every_label_exactly_once(tmp_path, kill_at):
    script = tmp_path / "run_loop.py"
    script.write_text(SIGKILL_SCRIPT.format(repo=str(REPO)))
    state = tmp_path / "run" / "state.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, str(script), str(state), str(kill_at)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    finished = subprocess.run([sys.executable, str(script), str(state), "0"], env=env, capture_output=True)
    assert finished.returncode == 0, finished.stderr.decode()
    resumed = ActiveLearningLoop(POOL, **loop_kwargs(state))
    assert outcome(resumed) == reference(tmp_path)
    labeled = [i for i, _ in resumed.state["labeled"]]
    assert len(labeled) == len(set(labeled)) == 20
    assert [p.name for p in state.parent.iterdir()] == ["state.json"]  # the killed save's temp file is gone


# -- annotators through files -----------------------------------------------------------------------------------


def _fill(rows, answer):
    return [{**row, "label": answer(int(row["index"]))} for row in rows]


def test_csv_export_and_import_round_trip(tmp_path):
    export = tmp_path / "to_label.csv"
    kwargs = loop_kwargs(tmp_path / "s.json", oracle=None, export_path=export, budget=10)
    loop = ActiveLearningLoop(POOL, **kwargs)
    loop.run()
    assert loop.waiting_for_labels and len(loop.history) == 1
    with export.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [""] * 5
    features = np.load(tmp_path / rows[0]["features_file"])
    np.testing.assert_array_equal(features, POOL[[int(r["index"]) for r in rows]])
    assert [int(r["features_row"]) for r in rows] == list(range(5))
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)

    half = tmp_path / "half.csv"
    _write_csv(half, _fill(rows[:2], lambda i: TRUTH[i]) + _fill(rows[2:], lambda i: ""))
    assert loop.import_labels(half) == 2
    assert loop.import_labels(half) == 0  # importing twice records nothing twice
    loop.run()
    assert loop.waiting_for_labels and len(loop.history) == 1
    with export.open() as f:
        assert len(list(csv.DictReader(f))) == 3  # re-exported: only the items still missing

    done = tmp_path / "done.csv"
    _write_csv(done, _fill(rows, lambda i: TRUTH[i]))
    restarted = ActiveLearningLoop(POOL, **kwargs)  # a new process imports the annotators' file
    assert restarted.import_labels(done) == 3
    restarted.run()
    assert len(restarted.history) == 2 and restarted.waiting_for_labels  # round 2 is out for labeling
    np.testing.assert_array_equal(restarted.labels, TRUTH[restarted.labeled_indices])


def test_json_export_and_conflicting_or_unqueried_labels(tmp_path):
    export = tmp_path / "to_label.json"
    loop = ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json", oracle=None, export_path=export))
    loop.run()
    data = json.loads(export.read_text())
    queried = [item["index"] for item in data["items"]]
    assert data["round"] == 1 and all(item["label"] is None for item in data["items"])
    unqueried = next(i for i in range(N_POOL) if i not in queried and i > 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({str(unqueried): 1}))
    with pytest.raises(InputError, match="was not queried"):
        loop.import_labels(bad)
    for item in data["items"]:
        item["label"] = int(TRUTH[item["index"]])
    export.write_text(json.dumps(data))
    assert loop.import_labels(export) == 5
    conflict = tmp_path / "conflict.json"
    conflict.write_text(json.dumps({str(queried[0]): int(TRUTH[queried[0]]) + 1}))
    with pytest.raises(InputError, match="already labeled"):
        loop.import_labels(conflict)
    loop.run(max_rounds=1)
    assert len(loop.history) == 2


def _write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# -- history ----------------------------------------------------------------------------------------------------


def test_history_json_and_learning_curve(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    loop = ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json"))
    loop.run()
    loop.save_history(tmp_path / "history.json")
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved == loop.history
    assert set(saved[1]) == {"round", "n_labeled", "metric", "seconds", "queried", "scores"}
    ax = loop.plot_history(path=tmp_path / "curve.png", label="bald")
    assert (tmp_path / "curve.png").stat().st_size > 0
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [r["n_labeled"] for r in saved])
    ax2 = plot_history(saved, ax=ax, label="random")
    assert ax2 is ax and len(ax.lines) == 2


def test_no_temporary_files_are_left_behind(tmp_path):
    ActiveLearningLoop(POOL, **loop_kwargs(tmp_path / "s.json")).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


# -- the same loop with real models of both frameworks ------------------------------------------------------------


def test_same_loop_code_drives_a_torch_and_a_keras_model(tmp_path, monkeypatch, backend):
    monkeypatch.undo()  # the real mcu.active.query
    from tests.active.test_query import tiny_model

    import mcu

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)

    def evaluate(model):
        logits = mcu.sample(model, x, 1, seed=0)[0]
        return float((logits.argmax(-1) == y).mean())

    loop = ActiveLearningLoop(
        x, retrain=lambda idx, labels: tiny_model(backend), evaluate=evaluate, state_path=tmp_path / "s.json",
        query_size=4, oracle=lambda idx: y[idx], initial_indices=[0, 1], initial_labels=y[[0, 1]], budget=8,
        seed=0, query_options={"n_samples": 5, "batch_size": 16},
    )
    history = loop.run()
    assert [r["n_labeled"] for r in history] == [2, 6, 10]
    assert loop.stopped == "budget"
