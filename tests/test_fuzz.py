"""Fuzzing the public API with malformed arguments (hypothesis, fixed seed).

Every call either returns or raises an ``MCUError`` / ``ValueError`` subclass whose message starts with the
name of an argument of that call (or of the object it reads); never another exception type. For sampling,
the model is byte-identical afterwards and the next valid seeded call returns exactly the reference samples.

Derandomized with a fixed number of examples per target, so the run is the same everywhere (CI included).
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mcu
from mcu.errors import MCUError

settings.register_profile(
    "mcu-fuzz", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("mcu-fuzz")

#: Values that are wrong for almost every argument: wrong types, NaN, infinities, bools, huge and negative numbers.
BAD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**64, 2**32 + 1, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True, width=64), st.sampled_from([float("nan"), float("inf"), 0.5, 1e308]),
    st.text(max_size=4), st.sampled_from(["auto", "fp16", "3", "torch", "max", "nan"]),
    st.lists(st.integers(-2, 5), max_size=3), st.just({"a": 1}), st.just(object()), st.just(np.array([1.0, np.nan])),
    st.just(np.float32("nan")), st.just(np.int64(3)), st.just(np.bool_(True)),
)


def maybe(valid, bad=BAD):
    """Valid values three times in four, malformed ones otherwise (so that calls with several arguments
    also succeed often enough for their results to be checked)."""
    return st.integers(0, 3).flatmap(lambda i: valid if i else bad)


def assert_clear(exc: BaseException, arguments: tuple[str, ...]) -> None:
    """An MCUError or ValueError whose message starts with the name of one of ``arguments``."""
    assert isinstance(exc, (MCUError, ValueError)), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    named = re.match(r"\[?([A-Za-z_][A-Za-z_0-9.]*)", message)
    assert named and named.group(1).split(".")[0] in arguments, f"names no argument of {arguments}: {message!r}"


def call(fn, arguments: tuple[str, ...]):
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - the point: which exceptions escape
        assert_clear(exc, arguments)
        event(f"raised {type(exc).__name__} ({str(exc).split(':')[0]})")
        return None
    event("returned")
    return result


# ---- sampling -----------------------------------------------------------------------------------------------

SAMPLE_ARGS = ("model", "x", "n_samples", "strategy", "chunk_size", "precision", "seed", "backend", "mode",
               "max_memory", "workers", "return_info")


@functools.cache
def _setup(backend: str):
    from tests import _models

    zoo = _models.zoo(backend)
    model = zoo.mlp()
    x = zoo.vector(np.random.default_rng(0), 3)
    reference = mcu.sample(model, x, 3, seed=11)
    return zoo, model, x, reference


def bad_inputs(x: np.ndarray):
    d = x.shape[1]
    with_nan = x.copy()
    with_nan[0, 0] = np.nan
    objects = x.astype(object)
    return st.sampled_from([
        x, x[:, :5], x[None], x[0], x[:0], x.astype(np.float64) * 1e300, with_nan, objects, x.astype(str),
        x.astype(np.int64), x.astype(bool), x.astype(np.complex64), x.tolist(), "x", None, np.float32(1.0),
        np.concatenate([x, np.full((1, d), np.inf, np.float32)]), x.astype(np.float16),
    ])


def _sample_kwargs(backend: str, x: np.ndarray):
    return st.fixed_dictionaries({"x": st.one_of(st.just(x), bad_inputs(x))}, optional={
        "n_samples": maybe(st.integers(1, 3)),
        "strategy": maybe(st.sampled_from(["auto", "loop", "vectorized", "prefix", "parallel"])),
        "chunk_size": maybe(st.integers(1, 40)),
        "seed": maybe(st.integers(0, 2**64 + 2)),
        "backend": maybe(st.sampled_from([backend, "pytorch" if backend == "torch" else "keras", "jax"])),
        "mode": maybe(st.sampled_from(["dropout", "training"])),
        "max_memory": maybe(st.integers(1, 10**9)),
        "workers": maybe(st.integers(1, 3)),
        "precision": maybe(st.just("fp32")),
    })


def _check_model_untouched(backend, kwargs):
    zoo, model, x, reference = _setup(backend)
    before = zoo.snapshot(model)
    kwargs = dict(kwargs)
    inputs = kwargs.pop("x", x)
    n_samples = kwargs.pop("n_samples", 2)
    out = call(lambda: mcu.sample(model, inputs, n_samples, **kwargs), SAMPLE_ARGS)
    if out is not None:
        assert isinstance(out, np.ndarray) and out.shape[0] == n_samples and np.isfinite(out).all()
    assert zoo.same(before, zoo.snapshot(model)), "the model changed"
    np.testing.assert_array_equal(mcu.sample(model, x, 3, seed=11), reference)  # the next valid call is right


@pytest.mark.parametrize("backend_name", ["torch", "tensorflow"])
@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_fuzz_sample(backend_name, data):
    from tests.conftest import require_backend

    require_backend(backend_name)
    _, _, x, _ = _setup(backend_name)
    _check_model_untouched(backend_name, data.draw(_sample_kwargs(backend_name, x)))


PREDICT_ARGS = SAMPLE_ARGS + ("task", "from_logits", "batch_size", "tol", "max_samples", "score", "noise_var",
                              "heteroscedastic", "progress", "engine", "unknown", "level")


def test_fuzz_predict():
    from tests.conftest import require_backend

    require_backend("torch")
    zoo, model, x, _ = _setup("torch")

    @settings(FUZZ, max_examples=80)
    @given(st.fixed_dictionaries({"x": st.one_of(st.just(x), bad_inputs(x))}, optional={
        "n_samples": maybe(st.one_of(st.integers(1, 4), st.just("auto"))),
        "task": maybe(st.sampled_from(["classification", "regression"])),
        "from_logits": maybe(st.booleans()),
        "seed": maybe(st.integers(0, 2**64 + 2)),
        "batch_size": maybe(st.integers(1, 4)),
        "tol": maybe(st.floats(0.001, 1.0)),
        "max_samples": maybe(st.integers(2, 6)),
        "score": maybe(st.sampled_from(["mutual_information", "predictive_entropy", "predictive_mean"])),
        "noise_var": maybe(st.floats(0.0, 2.0)),
        "heteroscedastic": maybe(st.booleans()),
        "engine": maybe(st.just("local")),
        "unknown": BAD,
    }))
    def run(kwargs):
        before = zoo.snapshot(model)
        kwargs = dict(kwargs)
        inputs = kwargs.pop("x", x)
        result = call(lambda: mcu.predict(model, inputs, **kwargs), PREDICT_ARGS)
        if result is not None:
            values = result.to_dict()
            if values["n_samples"].min() < 2:
                values.pop("standard_error", None)  # documented NaN: no spread from one sample
            assert all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values.values()
                       if np.asarray(v).dtype.kind in "fi")
            call(lambda: result.interval(kwargs.get("tol", 0.9)), ("interval", "level"))
        assert zoo.same(before, zoo.snapshot(model))

    run()


# ---- metrics ------------------------------------------------------------------------------------------------

CLASSIFICATION = ("mean_probabilities", "predictive_entropy", "expected_entropy", "mutual_information",
                  "variation_ratio", "margin", "max_probability", "predictive_variance", "classification_summary")
REGRESSION = ("predictive_mean", "epistemic_variance", "epistemic_std", "predictive_mean_standard_error")


def arrays():
    """Sample stacks: mostly the right rank with random values, sometimes wrong ranks, dtypes or values."""
    shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)
    values = st.sampled_from([0.0, 0.25, 1.0, -1.0, 1e308, -1e308, np.nan, np.inf, 3.0])
    numeric = st.builds(lambda shape, fill, noise: np.full(shape, fill) + noise * np.arange(math.prod(shape)).reshape(shape),
                        shapes, values, st.sampled_from([0.0, 0.1, 1e300]))
    dirichlet = st.builds(lambda t, n, c, seed: np.random.default_rng(seed).dirichlet(np.ones(c), (t, n)),
                          st.integers(1, 3), st.integers(0, 3), st.integers(1, 4), st.integers(0, 9))
    logits = st.builds(lambda t, n, c, scale: np.random.default_rng(0).uniform(-1, 1, (t, n, c)) * scale,
                       st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.sampled_from([1.0, 1e200, 1e308]))
    weird = st.sampled_from([None, "abc", [[["a"]]], [[1, 2], [3]], np.array([["x"]]), np.zeros((2, 2), dtype=object),
                             np.zeros((1, 1, 2), dtype=np.complex128), True, 3])
    return st.one_of(numeric, dirichlet, logits, weird)


@settings(FUZZ, max_examples=400)
@given(name=st.sampled_from(CLASSIFICATION + REGRESSION), samples=arrays(), from_logits=maybe(st.booleans()),
       base=maybe(st.sampled_from([None, 2, math.e])), use_base=st.booleans())
def test_fuzz_metrics(name, samples, from_logits, base, use_base):
    import warnings

    fn = getattr(mcu.metrics, name)
    kwargs = {} if name in REGRESSION else {"from_logits": from_logits}
    if use_base and name in ("predictive_entropy", "expected_entropy", "mutual_information", "classification_summary"):
        kwargs["base"] = base
    regression = name in REGRESSION
    with warnings.catch_warnings(), np.errstate(over="ignore" if regression else "warn"):
        # classification: an overflow or invalid-value warning is a silent NaN in the making. Regression: a
        # variance beyond the float64 range (outputs near 1e200) is inf, the float64 answer, never NaN.
        warnings.simplefilter("error")
        out = call(lambda: fn(samples, **kwargs), ("samples", "from_logits", "base"))
    if out is not None and not (name == "predictive_mean_standard_error" and len(samples) == 1):  # T = 1: NaN
        values = out.values() if isinstance(out, dict) else [out]
        for value in values:
            value = np.asarray(value, dtype=np.float64)
            ok = ~np.isnan(value) if regression else np.isfinite(value)
            assert ok.all(), (name, samples, kwargs, out)


@settings(FUZZ, max_examples=300)
@given(name=st.sampled_from(["reliability_diagram", "expected_calibration_error", "brier_score",
                             "negative_log_likelihood", "quantile_interval", "gaussian_interval", "conformal_scale",
                             "aurc", "risk_coverage_curve", "auroc"]),
       first=maybe(st.integers(0, 9).map(lambda seed: np.random.default_rng(seed).dirichlet(np.ones(3), 4)),
                   arrays()),
       second=maybe(st.lists(st.integers(0, 2), min_size=4, max_size=4), st.lists(st.integers(-1, 3), max_size=5)),
       third=maybe(st.sampled_from([5, 0.9]), BAD))
def test_fuzz_more_metrics(name, first, second, third):
    fn = getattr(mcu.metrics, name)
    calls = {
        "reliability_diagram": lambda: fn(first, second, third),
        "expected_calibration_error": lambda: fn(first, second, third),
        "brier_score": lambda: fn(first, second),
        "negative_log_likelihood": lambda: fn(first, second),
        "quantile_interval": lambda: fn(first, third),
        "gaussian_interval": lambda: fn(first, third, noise_var=second),
        "conformal_scale": lambda: fn(first, second, first, third),
        "aurc": lambda: fn(first, second),
        "risk_coverage_curve": lambda: fn(first, second),
        "auroc": lambda: fn(first, second),
    }
    names = ("probs", "labels", "n_bins", "samples", "level", "mean", "std", "y", "uncertainty", "correct",
             "scores_pos", "scores_neg", "noise_var", "log_var_samples", "scale")
    call(calls[name], names)


# ---- active learning ----------------------------------------------------------------------------------------

QUERY_ARGS = ("model", "pool", "k", "heuristic", "n_samples", "batch_size", "seed", "progress", "backend",
              "from_logits", "subset", "n_candidates", "strategy", "engine", "engine_options", "unknown")


def test_fuzz_query():
    from tests.conftest import require_backend

    require_backend("torch")
    from mcu.active import query as active_query

    zoo, model, _, _ = _setup("torch")
    pool = zoo.vector(np.random.default_rng(1), 7)

    @settings(FUZZ, max_examples=80)
    @given(k=maybe(st.integers(1, 8)), kwargs=st.fixed_dictionaries({}, optional={
        "heuristic": maybe(st.sampled_from(["bald", "entropy", "margin", "random", "batchbald", "variation_ratio"])),
        "n_samples": maybe(st.integers(1, 3)),
        "batch_size": maybe(st.integers(1, 8)),
        "seed": maybe(st.integers(0, 2**64 + 2)),
        "from_logits": maybe(st.booleans()),
        "subset": maybe(st.lists(st.integers(-1, 8), max_size=5)),
        "n_candidates": maybe(st.integers(1, 8)),
        "engine": maybe(st.just("local")),
    }), pool_value=maybe(st.just(pool), st.sampled_from([pool[:0], pool[0], "pool", pool.astype(object)])))
    def run(k, kwargs, pool_value):
        before = zoo.snapshot(model)
        result = call(lambda: active_query(model, pool_value, k, progress=False, **kwargs), QUERY_ARGS)
        if result is not None:
            indices, scores = result
            assert len(indices) == len(scores) == k and len(set(indices.tolist())) == k
        assert zoo.same(before, zoo.snapshot(model))

    run()


LOOP_ARGS = ("pool", "retrain", "evaluate", "state_path", "query_size", "oracle", "export_path", "initial_indices",
             "initial_labels", "model", "budget", "patience", "min_delta", "mode", "heuristic", "seed",
             "query_options", "labels", "max_rounds", "path")


@settings(FUZZ, max_examples=200)
@given(kwargs=st.fixed_dictionaries({}, optional={
    "query_size": maybe(st.integers(1, 4)),
    "budget": maybe(st.integers(0, 6)),
    "patience": maybe(st.integers(1, 3)),
    "min_delta": maybe(st.floats(0, 1)),
    "mode": maybe(st.sampled_from(["max", "min"])),
    "heuristic": maybe(st.sampled_from(["bald", "random"])),
    "seed": maybe(st.integers(0, 2**64 + 2)),
    "query_options": maybe(st.just({"n_samples": 2})),
    "initial_indices": maybe(st.lists(st.integers(-1, 12), max_size=3)),
    "oracle": maybe(st.sampled_from(["labels", "dict", "none", "short", "strings"])),
    "evaluate": maybe(st.sampled_from([0.5, "0.5", float("nan"), None, [1]])),
    "export_path": maybe(st.sampled_from([None, "out.csv", "out.txt"])),
}), max_rounds=maybe(st.integers(1, 3)))
def test_fuzz_active_learning_loop(tmp_path_factory, kwargs, max_rounds):
    loop_module = importlib.import_module("mcu.active.loop")
    pool = np.arange(10, dtype=np.float32).reshape(10, 1)
    truth = np.arange(10) % 2
    oracles = {"labels": lambda idx: truth[idx], "dict": lambda idx: {int(i): 0 for i in idx},
               "none": lambda idx: None, "short": lambda idx: truth[idx][:-1], "strings": lambda idx: "ab"}
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("oracle"), str) and kwargs["oracle"] in oracles:
        kwargs["oracle"] = oracles[kwargs["oracle"]]
    metric = kwargs.pop("evaluate", 0.5)
    indices = kwargs.pop("initial_indices", [0, 1])
    labels = truth[[i for i in indices if isinstance(i, int) and 0 <= i < 10]] if isinstance(indices, list) else []
    directory = tmp_path_factory.mktemp("loop")
    if isinstance(kwargs.get("export_path"), str):
        kwargs["export_path"] = directory / kwargs["export_path"]
    original = loop_module.query

    def fake_query(model, pool, k, *, heuristic, seed, subset, **options):
        subset = np.asarray(subset)
        return subset[:k], np.linspace(1, 0, len(subset))[:k]

    loop_module.query = fake_query
    try:
        loop = call(lambda: loop_module.ActiveLearningLoop(
            pool, retrain=lambda i, y: {"n": len(i)}, evaluate=lambda m: metric, state_path=directory / "s.json",
            initial_indices=indices, initial_labels=labels, **{"query_size": 2, **kwargs}), LOOP_ARGS)
        if loop is not None:
            call(lambda: loop.run(max_rounds), LOOP_ARGS)
            for record in loop.history:
                assert math.isfinite(record["metric"])
            assert all(0 <= i < 10 for i, _ in loop.state["labeled"])
            assert all(label in (0, 1) for _, label in loop.state["labeled"])  # never an index stored as a label
    finally:
        loop_module.query = original


@settings(FUZZ, max_examples=100)
@given(content=st.one_of(st.binary(max_size=30), st.sampled_from([
    b"index,label\n3.0,1\n", b"index,label\n1e3,1\n", b"index,label\n,1\n", b"label\n1\n", b"{}", b"[1,2]",
    b'{"items": [{"label": 1}]}', b'{"items": [{"index": "x", "label": 1}]}', b'{"3": 1}', b'{"x": 1}',
    b'{"items": 5}', b"\xff\xfe", b"index,label\n-1,1\n", b'{"items": [{"index": 2.5, "label": 0}]}'])),
       suffix=st.sampled_from([".csv", ".json", ".txt"]))
def test_fuzz_label_import(tmp_path_factory, content, suffix):
    loop_module = importlib.import_module("mcu.active.loop")
    directory = tmp_path_factory.mktemp("import")
    original = loop_module.query
    loop_module.query = lambda model, pool, k, *, subset, **kw: (np.asarray(subset)[:k], np.ones(k))
    try:
        loop = loop_module.ActiveLearningLoop(
            np.zeros((6, 1), np.float32), retrain=lambda i, y: 0, evaluate=lambda m: 0.5,
            state_path=directory / "s.json", query_size=2, export_path=directory / "out.csv",
            initial_indices=[0], initial_labels=[1])
        loop.run()
        path = Path(directory / f"labels{suffix}")
        path.write_bytes(content)
        call(lambda: loop.import_labels(path), ("path", "labels"))
        assert all(0 <= i < 6 for i, _ in loop.state["labeled"])
    finally:
        loop_module.query = original


# ---- drift monitoring and triage ----------------------------------------------------------------------------


@settings(FUZZ, max_examples=200)
@given(reference=maybe(st.just(np.linspace(0, 1, 30)), arrays()), kwargs=st.fixed_dictionaries({}, optional={
    "window": maybe(st.integers(1, 20)), "step": maybe(st.integers(1, 20)), "alpha": maybe(st.floats(0.001, 0.5)),
    "min_effect_size": maybe(st.floats(0, 2))}), stream=maybe(st.just(np.linspace(0.5, 2, 25)), arrays()))
def test_fuzz_drift_monitor(reference, kwargs, stream):
    from mcu.monitor import DriftMonitor

    names = ("reference_scores", "window", "step", "alpha", "min_effect_size", "scores")
    monitor = call(lambda: DriftMonitor(reference, **kwargs), names)
    if monitor is not None:
        assert math.isfinite(monitor.alpha) and math.isfinite(monitor.min_effect_size)
        call(lambda: monitor.update(stream), names)
        call(lambda: monitor.check(stream), names)
        for check in monitor.checks:
            assert 0 <= check.p_value <= 1 and math.isfinite(check.effect_size)


@settings(FUZZ, max_examples=200)
@given(uncertainty=maybe(st.just(np.linspace(0, 1, 10)), arrays()),
       correct=maybe(st.just(np.array([1, 1, 1, 0, 1, 1, 0, 1, 0, 0])), arrays()),
       review=maybe(st.floats(0, 1)), accuracy=maybe(st.floats(0, 1)),
       tiers=maybe(st.sampled_from([("auto", "review"), ("auto", "verify", "review"), ("a",), ("a", "a"), "ab"])),
       thresholds=maybe(st.lists(st.floats(allow_nan=True), max_size=3), BAD))
def test_fuzz_triage(uncertainty, correct, review, accuracy, tiers, thresholds):
    import warnings

    from mcu.triage import Triage, fit_thresholds

    names = ("uncertainty", "correct", "target_review_rate", "target_auto_accuracy", "tiers", "thresholds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the documented "middle tier is empty" warning
        fitted = call(lambda: fit_thresholds(uncertainty, correct, target_review_rate=review,
                                             target_auto_accuracy=accuracy, tiers=tiers), names)
    if fitted is not None:
        call(lambda: fitted.report(uncertainty, correct), names)
    triage = call(lambda: Triage(thresholds, tiers), names)
    if triage is not None:
        call(lambda: triage.route(uncertainty), names)
