"""The ``from_logits`` defaults follow one rule (README, docs/architecture.md); changing one is a decision.

Functions that run the model default to ``True``; functions on samples the caller passes default to ``False``;
where samples come from either side (acquisition functions, the streaming accumulator) there is no default.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from mcu import metrics
from mcu.active import acquisition
from tests.conftest import require_module

EMPTY = inspect.Parameter.empty


def _default(function):
    return inspect.signature(function).parameters["from_logits"].default


RUN_THE_MODEL = [
    ("mcu.core.predict", "predict"),
    ("mcu.core.scoring", "score_batch"),
    ("mcu.active.querying", "query"),
    ("mcu.active.querying", "score_chunk"),
]


@pytest.mark.parametrize("module, name", RUN_THE_MODEL)
def test_functions_that_run_the_model_default_to_logits(module, name):
    assert _default(getattr(importlib.import_module(module), name)) is True


def test_ray_engine_defaults_like_the_local_one():
    require_module("ray")
    from mcu.distributed import ray_engine

    assert _default(ray_engine.predict) is True and _default(ray_engine.query) is True


def test_metrics_on_samples_default_to_probabilities():
    names = [n for n in metrics.__all__ if callable(getattr(metrics, n)) and not inspect.isclass(getattr(metrics, n))]
    with_flag = [n for n in names if "from_logits" in inspect.signature(getattr(metrics, n)).parameters]
    assert len(with_flag) >= 10  # every classification metric and the convergence helpers
    assert {n: _default(getattr(metrics, n)) for n in with_flag} == dict.fromkeys(with_flag, False)


def test_either_side_has_no_default():
    for name in ("entropy", "bald", "variation_ratio", "margin", "least_confidence", "batch_bald"):
        assert _default(getattr(acquisition, name)) is EMPTY, name
    assert _default(metrics.ClassificationAccumulator) is EMPTY
    # random ignores the values of its samples (only N is used): the flag is accepted and unused
    assert _default(acquisition.random) is False
