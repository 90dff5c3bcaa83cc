"""Regression tests of issue 19 (hardening): every misuse gets a clear error naming the argument, nothing is
silently wrong, no call is allowed to blow the memory. One test (or group) per finding of the issue."""

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
from mcu.strategies import prefix as prefix_module
from mcu.strategies.base import SeedStream

loop_module = importlib.import_module("mcu.active.loop")
REPO = Path(__file__).resolve().parents[1]
MCU_ROOT = str(Path(mcu.__file__).resolve().parents[1])  # the mcu under test (subprocesses import the same)


# ---- item 2: n_samples is bounded by memory, seeds are made per block ---------------------------------------


def _record_takes(monkeypatch) -> list[int]:
    taken: list[int] = []
    original = SeedStream.take

    def take(self, n):
        taken.append(n)
        return original(self, n)

    monkeypatch.setattr(SeedStream, "take", take)
    return taken


@pytest.mark.parametrize("strategy", ["prefix", "parallel"])
def test_seeds_are_made_per_group_and_grouping_changes_no_sample(backend, models, rng, monkeypatch, strategy):
    model, x = models.cnn(), models.image(rng, 3)
    whole = mcu.sample(model, x, 40, strategy=strategy, chunk_size=3 * 4, seed=5, workers=2)
    taken = _record_takes(monkeypatch)
    monkeypatch.setattr(prefix_module, "SEED_GROUP", 8, raising=False)
    grouped = mcu.sample(model, x, 40, strategy=strategy, chunk_size=3 * 4, seed=5, workers=2)
    assert taken and max(taken) <= 8, taken  # seeds for at most one group at a time, never all 40 at once
    np.testing.assert_array_equal(grouped, whole)


_HUGE = """
import resource, sys, numpy as np, mcu
from tests import _models
z = _models.zoo(sys.argv[1])
model, x = z.mlp(), z.vector(np.random.default_rng(0), 4)
mcu.sample(model, x, 3, seed=0)  # warm up: framework allocations happen before the limit
with open("/proc/self/status") as fh:
    vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))  # 3 GiB more at most
for strategy in ("auto", "loop", "vectorized", "prefix", "parallel"):
    try:
        mcu.sample(model, x, 10**9, strategy=strategy, seed=0)
        print(strategy, "returned")
    except BaseException as exc:
        print(strategy, type(exc).__name__, str(exc).split(":")[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_a_billion_samples_is_refused_before_allocating(backend):
    """``mcu.sample(model, x, 10**9)`` used to build 10**9 seeds first (PyTorch: a 7.45 GiB allocation, Keras:
    24 GB until the kernel killed it). Now every strategy raises InputError naming n_samples after one block;
    run under an address-space limit of 3 GiB more than the warmed-up process, so a regression fails here
    (MemoryError) instead of exhausting the machine."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([MCU_ROOT, str(REPO)]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", _HUGE, backend], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO, check=False)
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in
             ("auto", "loop", "vectorized", "prefix", "parallel")]
    assert lines == [f"{s} InputError n_samples" for s in ("auto", "loop", "vectorized", "prefix", "parallel")], (
        out.stdout + out.stderr[-2000:])


def test_n_samples_above_the_seed_space_is_refused(backend, models, rng):
    with pytest.raises(InputError, match=r"n_samples: expected an integer in \[1, 4294967296\]"):
        mcu.sample(models.mlp(), models.vector(rng, 2), 2**32 + 1)


# ---- item 3: silent wrong results ---------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["alpha", "min_effect_size"])
def test_drift_monitor_refuses_nan_parameters(argument):
    with pytest.raises(InputError, match=f"{argument}: expected"):
        DriftMonitor(np.linspace(0, 1, 50), **{argument: float("nan")})


def test_float64_input_beyond_the_model_dtype_is_refused(backend, models):
    x = np.full((2, 784), 1e300)  # finite in float64, inf in float32
    with pytest.raises(InputError, match="x: contains .*(beyond|after conversion)"):
        mcu.sample(models.mlp(), x, 2, seed=0)
    with pytest.raises(InputError, match="^x: "):
        mcu.predict(models.mlp(), x, 2, seed=0)


# ---- item 4: errors that say what is wrong ------------------------------------------------------------------


def test_an_exception_inside_a_torch_model_is_the_models_not_the_inputs():
    from tests.conftest import require_backend

    require_backend("torch")
    import torch

    class Buggy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)

        def forward(self, x):
            h = self.drop(self.fc(x))
            if h.shape[0] > 0:
                raise ValueError("bug in the model")
            return h

    x = np.ones((2, 4), np.float32)
    for strategy in ("auto", "loop"):
        with pytest.raises(InputError, match="^model: the model raised ValueError: bug in the model") as info:
            mcu.sample(Buggy(), x, 3, strategy=strategy)
        assert isinstance(info.value.__cause__, ValueError) and str(info.value.__cause__) == "bug in the model"


def test_seed_range_is_one_rule_for_both_backends(backend, models, rng):
    model, x = models.mlp(), models.vector(rng, 2)
    assert mcu.sample(model, x, 2, seed=2**64 - 1).shape[:2] == (2, 2)
    for seed in (2**64, -1):
        with pytest.raises(InputError, match=r"seed: expected an integer in \[0, 18446744073709551615\]"):
            mcu.sample(model, x, 2, seed=seed)


def test_object_dtype_input_is_refused(backend, models):
    x = np.empty((2, 784), dtype=object)
    x[:] = 0.5
    with pytest.raises(InputError, match="x: expected an array of numbers .* got dtype object"):
        mcu.sample(models.mlp(), x, 2)


def test_unknown_predict_keyword_is_refused(backend, models, rng):
    with pytest.raises(InputError, match="unknown_kw: unknown keyword argument of mcu.predict"):
        mcu.predict(models.mlp(), models.vector(rng, 2), 2, unknown_kw=1)


# ---- item 3/4: active learning state, oracle and label files ------------------------------------------------

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


# ---- item 5: the CLI and the configuration -----------------------------------------------------------------


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


# ---- item 6: metrics on extreme finite logits ---------------------------------------------------------------


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
