"""Misuse of the applications, the CLI and the metrics gets a clear error naming the argument, and nothing is
silently wrong (the sampling call's own checks are in tests/core/test_sampling.py)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mcu
from mcu.errors import InputError, MCUError
from mcu.monitor import DriftMonitor

loop_module = importlib.import_module("mcu.active.loop")
REPO = Path(__file__).resolve().parents[1]
MCU_ROOT = str(Path(mcu.__file__).resolve().parents[1])  # the mcu under test (subprocesses import the same)


# ---- the drift monitor's parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["alpha", "min_effect_size"])
def test_drift_monitor_refuses_nan_parameters(argument):
    with pytest.raises(InputError, match=f"{argument}: expected"):
        DriftMonitor(np.linspace(0, 1, 50), **{argument: float("nan")})



# ---- active learning state, oracle and label files ------------------------------------------------

N_POOL = 20
POOL = np.arange(N_POOL, dtype=np.float32).reshape(N_POOL, 1)
TRUTH = np.arange(N_POOL) % 3


def _fake_query(model, pool, k, *, heuristic, seed, subset, **options):
    subset = np.asarray(subset)
    return subset[:k], np.linspace(1, 0, len(subset))[:k]


@pytest.fixture
def al(monkeypatch, tmp_path):
    monkeypatch.setattr(loop_module, "query", _fake_query)

    def make(**overrides):
        kwargs = {"retrain": lambda i, y: {"n": len(i)}, "evaluate": lambda m: 0.5, "state_path": tmp_path / "s.json",
                  "query_size": 3, "oracle": lambda idx: TRUTH[idx], "initial_indices": [0, 1],
                  "initial_labels": [0, 1], "budget": 6}
        return loop_module.ActiveLearningLoop(POOL, **{**kwargs, **overrides})

    return make


@pytest.mark.parametrize("answer, match", [
    (lambda idx: {int(i): int(TRUTH[i]) for i in idx}, "oracle: expected a sequence of 3 labels .* got dict"),
    (lambda idx: None, "oracle: expected a sequence of 3 labels .* got None"),
    (lambda idx: [None] * len(idx), "oracle: expected a label for every index"),
])
def test_oracle_answers_that_are_not_labels_are_refused(al, answer, match):
    loop = al(oracle=answer)
    with pytest.raises(InputError, match=match):
        loop.run()
    assert loop.state["labeled"] == [[0, 0], [1, 1]]  # nothing stored


def test_evaluate_returning_a_string_is_refused(al):
    with pytest.raises(InputError, match="evaluate: expected the callback to return a finite number, got '0.9'"):
        al(evaluate=lambda m: "0.9").run()


def _state(al, tmp_path) -> dict:
    al().run(max_rounds=1)
    return json.loads((tmp_path / "s.json").read_text())


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s["labeled"].append([N_POOL + 5, 0]), "indices in \\[0, 20\\)"),
    (lambda s: s.pop("pool_size"), "field 'pool_size' is missing"),
    (lambda s: s["labeled"].append([3, 0]) or s["labeled"].append([3, 1]), "holds an index twice"),
])
def test_inconsistent_state_files_are_refused(al, tmp_path, corrupt, match):
    state = _state(al, tmp_path)
    corrupt(state)
    (tmp_path / "s.json").write_text(json.dumps(state))
    with pytest.raises(InputError, match=f"state_path: .*{match}"):
        al()


def test_binary_state_file_is_refused(al, tmp_path):
    (tmp_path / "s.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(InputError, match="state_path: .* is not valid JSON"):
        al()


def _exported(al, tmp_path, suffix):
    loop = al(oracle=None, export_path=tmp_path / f"out{suffix}")
    loop.run()
    assert loop.waiting_for_labels
    return loop


def test_csv_index_that_is_not_an_integer_is_refused(al, tmp_path):
    loop = _exported(al, tmp_path, ".csv")
    pending = loop.pending_indices.tolist()
    (tmp_path / "labels.csv").write_text(f"index,label\n{pending[0]}.0,1\n")
    with pytest.raises(InputError, match=r"path: expected integer pool indices .*line 2.*got index '\d+\.0'"):
        loop.import_labels(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text(f"index,label\n{pending[0]},1\n")
    assert loop.import_labels(tmp_path / "labels.csv") == 1


def test_json_import_that_is_not_json_is_refused(al, tmp_path):
    loop = _exported(al, tmp_path, ".json")
    (tmp_path / "labels.json").write_text("index,label\n3,1\n")
    with pytest.raises(InputError, match="path: .* is not valid JSON"):
        loop.import_labels(tmp_path / "labels.json")
    (tmp_path / "labels.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="path: expected the exported structure or a mapping"):
        loop.import_labels(tmp_path / "labels.json")


# ---- the CLI and the configuration -----------------------------------------------------------------


@pytest.mark.parametrize("setup, match", [
    ({"env": "garbage"}, "MCU_BACKEND environment variable: unknown backend 'garbage'"),
    ({"pyproject": "[tool.mcu]\nbackend = 5\n"}, "unknown backend 5"),
    ({"pyproject": '[tool]\nmcu = "torch"\n'}, r"expected \[tool.mcu\] to be a table"),
])
def test_mcu_info_explains_a_misconfiguration(monkeypatch, tmp_path, capsys, setup, match):
    from mcu.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MCU_BACKEND", raising=False)
    if "env" in setup:
        monkeypatch.setenv("MCU_BACKEND", setup["env"])
    if "pyproject" in setup:
        (tmp_path / "pyproject.toml").write_text(setup["pyproject"])
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert "invalid configuration" in out
    assert any(line.startswith("error ") for line in out.splitlines())
    import re

    assert re.search(match, out), out


def test_a_non_table_tool_section_is_an_input_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MCU_BACKEND", raising=False)
    (tmp_path / "pyproject.toml").write_text('[tool]\nmcu = "torch"\n')
    with pytest.raises(InputError, match=r"pyproject.toml: expected \[tool.mcu\] to be a table"):
        mcu.config.configured_backend()


def test_bench_checks_out_before_running(monkeypatch, tmp_path, capsys):
    suite = importlib.import_module("mcu.bench.suite")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before --out was checked")

    monkeypatch.setattr(suite, "run", must_not_run)
    (tmp_path / "a_file").write_text("")
    from mcu.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--no-progress", "--out", str(tmp_path / "a_file" / "results")])
    assert exit_info.value.code == 2
    assert "--out: expected a folder the results can be written to" in capsys.readouterr().err


# ---- metrics on extreme finite logits ---------------------------------------------------------------


def test_metrics_of_finite_logits_near_the_float64_limit_are_exact():
    logits = np.array([[[1e308, -1e308, 0.0]], [[-1e308, 1e308, 1e308]]])  # p = (1, 0, 0) and (0, 1/2, 1/2)
    summary = mcu.metrics.classification_summary(logits, from_logits=True)
    np.testing.assert_allclose(summary["mean_probabilities"], [[0.5, 0.25, 0.25]])
    np.testing.assert_allclose(summary["expected_entropy"], [math.log(2) / 2])
    np.testing.assert_allclose(summary["predictive_entropy"], [1.5 * math.log(2)])
    np.testing.assert_allclose(summary["mutual_information"], [math.log(2)])
    acc = mcu.metrics.ClassificationAccumulator(from_logits=True)
    acc.update(logits)
    np.testing.assert_allclose(acc.result()["mutual_information"], [math.log(2)])


# ---- the shared check module --------------------------------------------------------------------------------


def _checks():
    return importlib.import_module("mcu._checks")


@pytest.mark.parametrize("call, message", [
    (lambda: _checks().check_int(True, "k", minimum=1), "k: expected an integer >= 1, got True."),
    (lambda: _checks().check_int(5, "k", minimum=1, maximum=3), "k: expected an integer in [1, 3], got 5."),
    (lambda: _checks().check_number(float("nan"), "tol", minimum=0, strict=True),
     "tol: expected a positive number, got nan."),
    (lambda: _checks().check_number(2, "alpha", minimum=0, maximum=1, strict=True),
     "alpha: expected a number strictly between 0 and 1, got 2."),
    (lambda: _checks().check_choice(np.array(["a"]), "mode", ("a", "b")),
     "mode: expected one of 'a', 'b', got array(['a'], dtype='<U1') (ndarray)."),
])
def test_checks_share_one_message_format(call, message):
    with pytest.raises(InputError) as info:
        call()
    assert str(info.value) == message
    assert isinstance(info.value, (MCUError, ValueError))


def test_old_check_names_stay_importable():
    from mcu.core.sampling import check_choice, check_int  # noqa: F401
    from mcu.metrics._validation import check_positive_int

    assert check_positive_int(3, "n_bins") == 3
    with pytest.raises(InputError, match="n_bins: expected an integer >= 1"):
        check_positive_int(0, "n_bins")


def test_the_checks_module_imports_no_framework():
    """mcu._checks is core: importing it must not import a framework (the design rule)."""
    code = textwrap.dedent("""
        import sys, mcu._checks
        assert not {"torch", "tensorflow", "keras"} & set(sys.modules), sorted(sys.modules)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": MCU_ROOT})
