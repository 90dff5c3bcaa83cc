"""When progress bars show: the argument, then ``MCU_PROGRESS``, then whether stderr is a terminal."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from mcu.core import progress
from mcu.core.progress import ENV_VAR, progress_bar, show_progress
from mcu.errors import InputError

pytest.importorskip("tqdm")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def stderr(monkeypatch):
    """Replace stderr by a fake stream; ``stderr(tty)`` selects whether it claims to be a terminal."""
    monkeypatch.delenv(ENV_VAR, raising=False)

    def use(tty: bool) -> io.StringIO:
        stream = _Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    return use


def _drawn(stream: io.StringIO) -> bool:
    with progress_bar(None, total=3, desc="unit-test", unit="step") as bar:
        for _ in range(3):
            bar.update()
    return "unit-test" in stream.getvalue()


def test_default_follows_whether_stderr_is_a_terminal(stderr):
    assert show_progress(None) is False and not _drawn(stderr(False))
    assert show_progress(None) is False  # still off: a pipe, a log file, pytest's capture
    assert _drawn(stderr(True)) and show_progress(None) is True


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), (" TRUE ", True), ("0", False),
                                             ("false", False), ("False", False)])
def test_environment_variable_beats_the_terminal_default(stderr, monkeypatch, value, expected):
    for tty in (False, True):
        stream = stderr(tty)
        monkeypatch.setenv(ENV_VAR, value)
        assert show_progress(None) is expected
        assert _drawn(stream) is expected


def test_argument_beats_the_environment_variable(stderr, monkeypatch):
    stream = stderr(False)
    monkeypatch.setenv(ENV_VAR, "0")
    assert show_progress(True) is True
    with progress_bar(True, total=1, desc="forced-on") as bar:
        bar.update()
    assert "forced-on" in stream.getvalue()
    stream = stderr(True)
    monkeypatch.setenv(ENV_VAR, "1")
    assert show_progress(False) is False
    with progress_bar(False, total=1, desc="forced-off") as bar:
        bar.update()
    assert stream.getvalue() == ""


@pytest.mark.parametrize("value", ["yes", "2", "", "on"])
def test_bad_environment_value_names_the_variable(stderr, monkeypatch, value):
    stderr(True)
    monkeypatch.setenv(ENV_VAR, value)
    expected = rf"MCU_PROGRESS environment variable: expected 1, 0, true or false, got {value!r}"
    with pytest.raises(InputError, match=expected):
        show_progress(None)
    assert show_progress(True) is True  # an explicit argument does not read the variable


@pytest.mark.parametrize("value", [1, "yes", 0.0])
def test_bad_argument_is_refused(value):
    with pytest.raises(InputError, match="progress: expected True, False or None"):
        show_progress(value)


def test_jupyter_kernel_counts_as_interactive(stderr, monkeypatch):
    stderr(False)

    class ZMQInteractiveShell:  # the class name IPython's kernel shell has
        pass

    fake = type(sys)("IPython")
    fake.get_ipython = lambda: ZMQInteractiveShell()
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert progress._interactive() is True
    fake.get_ipython = lambda: None  # plain python with IPython importable
    assert progress._interactive() is False


def test_query_and_predict_follow_the_rule(stderr, monkeypatch):
    """The public functions default to ``progress=None``: silent in a pipe, a bar on a terminal, the
    variable overriding both, the argument overriding the variable."""
    from mcu.active import query

    pool = np.random.default_rng(0).standard_normal((24, 3)).astype(np.float32)
    run = lambda **kw: query(None, pool, 2, heuristic="random", batch_size=8, seed=0, **kw)
    stream = stderr(False)
    expected = run()
    assert "mcu.active.query" not in stream.getvalue()
    stream = stderr(True)
    np.testing.assert_array_equal(run()[0], expected[0])
    assert "mcu.active.query" in stream.getvalue()
    stream = stderr(False)
    monkeypatch.setenv(ENV_VAR, "1")
    run()
    assert "mcu.active.query" in stream.getvalue()
    stream = stderr(True)
    monkeypatch.setenv(ENV_VAR, "true")
    run(progress=False)
    assert stream.getvalue() == ""
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(InputError, match="MCU_PROGRESS"):
        run()


def test_predict_bar_follows_the_environment_variable(stderr, monkeypatch):
    from tests.conftest import require_backend

    require_backend("torch")
    import torch

    import mcu

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)).eval()
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    stream = stderr(False)
    quiet = mcu.predict(model, x, 4, seed=0)
    assert "mcu.predict" not in stream.getvalue()
    monkeypatch.setenv(ENV_VAR, "1")
    shown = mcu.predict(model, x, 4, seed=0)
    assert "mcu.predict" in stream.getvalue()
    np.testing.assert_array_equal(quiet.mean, shown.mean)


def test_active_learning_loop_queries_without_bars_unless_asked(stderr, monkeypatch, tmp_path):
    """The loop's per-round queries: no bar by default (even on a terminal); MCU_PROGRESS or the loop's
    ``query_options`` turn it on."""
    import importlib

    from mcu.active import ActiveLearningLoop

    loop_module = importlib.import_module("mcu.active.loop")
    seen: list = []

    def recording_query(model, pool, k, *, heuristic, seed, subset, **options):
        seen.append(options.get("progress"))
        subset = np.asarray(subset)
        return subset[:k], np.zeros(min(k, len(subset)))

    monkeypatch.setattr(loop_module, "query", recording_query)
    pool = np.zeros((12, 1), dtype=np.float32)

    def run(name, **options):
        loop = ActiveLearningLoop(pool, retrain=lambda i, y: None, evaluate=lambda m: 0.0,
                                  state_path=tmp_path / name / "s.json", query_size=2,
                                  oracle=lambda i: np.zeros(len(i)), initial_indices=[0], initial_labels=[0],
                                  budget=2, seed=0, query_options=options)
        loop.run()
        return seen.pop()

    stderr(True)
    assert run("default") is False
    monkeypatch.setenv(ENV_VAR, "1")
    assert run("env") is True
    assert run("argument", progress=False) is False
    monkeypatch.setenv(ENV_VAR, "0")
    assert run("argument-on", progress=True) is True
