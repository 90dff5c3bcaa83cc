"""Shared fixtures. ``backend`` runs a test once per framework.

Locally a missing framework skips its half; set ``MCU_REQUIRE_BACKENDS=torch,tensorflow`` (CI does) to turn
such a skip into a failure, so a broken install can never pass as green. Framework-specific test modules
import their framework with :func:`require_module` (not ``pytest.importorskip``) for the same guarantee;
``MCU_REQUIRE_RAY=1`` does the same for Ray. ``MCU_BLOCK_TENSORFLOW=1`` hides TensorFlow from the test process
(as if not installed: :mod:`tests._no_tensorflow`), to run the Keras tests on JAX or PyTorch without it.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("MCU_BLOCK_TENSORFLOW") == "1":
    from tests import _no_tensorflow

    _no_tensorflow.install()

BACKENDS = ("torch", "tensorflow")


#: module -> the backend it belongs to (a module whose backend is in MCU_REQUIRE_BACKENDS must import)
_BACKEND_OF = {"torch": "torch", "tensorflow": "tensorflow", "keras": "tensorflow", "transformers": "torch"}
#: modules that MCU_REQUIRE_RAY=1 makes mandatory
_RAY_MODULES = ("ray", "pyarrow")


def _required_backends() -> list[str]:
    return [b.strip() for b in os.environ.get("MCU_REQUIRE_BACKENDS", "").split(",") if b.strip()]


def _keras_framework() -> str | None:
    """The framework Keras runs on in this process (None: Keras is not installed)."""
    from mcu.backends import keras_backend

    found = keras_backend()
    return None if found is None else found[0]


def require_module(name: str) -> Any:
    """Import and return module ``name``; if it cannot be imported, skip (locally) or fail (when required).

    Required means: ``name``'s backend is listed in ``MCU_REQUIRE_BACKENDS`` (torch; keras for ``tensorflow``, and
    tensorflow too when Keras runs on TensorFlow), or ``name`` is ray/pyarrow and ``MCU_REQUIRE_RAY=1``. Usable at
    module level (it then skips or fails the whole module) and inside a test.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        backend = _BACKEND_OF.get(name)
        if name == "tensorflow" and _keras_framework() not in (None, "tensorflow"):
            backend = None  # the Keras backend runs on JAX or PyTorch here: TensorFlow is not part of it
        if backend is not None and backend in _required_backends():
            pytest.fail(f"{name} is required (MCU_REQUIRE_BACKENDS includes {backend!r}) but cannot be imported: "
                        f"{exc}", pytrace=False)
        if name in _RAY_MODULES and os.environ.get("MCU_REQUIRE_RAY") == "1":
            pytest.fail(f"{name} is required (MCU_REQUIRE_RAY=1) but cannot be imported: {exc}", pytrace=False)
        pytest.skip(f"{name} is not installed ({exc})", allow_module_level=True)


def _graph_only_reason(keras: Any, what: str) -> str | None:
    """The skip reason of a check that needs the TensorFlow-graph fast path, or None when Keras runs on TensorFlow."""
    name = keras.backend.backend()
    return None if name == "tensorflow" else f"TensorFlow-graph fast path: {what} (this Keras runs on {name!r})"


def tensorflow_graph_only(keras: Any, what: str) -> pytest.MarkDecorator:
    """Mark a Keras test that needs the TensorFlow-graph fast path (traced functions, the prefix split, per-sample
    masks, the mixed-precision copy, TensorFlow tensors or tapes): skipped when Keras runs on JAX or PyTorch, with
    a reason naming the dependence. Such skips are not passes: ``pytest -rs`` lists them (``.ci/run`` does)."""
    reason = _graph_only_reason(keras, what)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require_tensorflow_graph(what: str) -> Any:
    """:func:`tensorflow_graph_only` as a call: inside a test it skips that test, at module level the module (the
    same reason). Returns the keras module."""
    keras = require_module("keras")
    reason = _graph_only_reason(keras, what)
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    return keras


def keras_training_passes(keras: Any, model: Any, x: np.ndarray, n: int) -> np.ndarray:
    """The literal MC-dropout recipe, ``n`` passes of ``model(x, training=True)`` (each draws new masks), compiled
    as a user would: ``tf.function`` on TensorFlow, ``jax.jit`` of ``stateless_call`` carrying the seed states on
    JAX; eager passes without gradients on PyTorch. Returns ``(n, *output)``."""
    name = keras.backend.backend()
    if name == "tensorflow":
        tf = require_module("tensorflow")
        passes = tf.function(lambda v: model(v, training=True))
        return np.stack([np.asarray(passes(tf.constant(x))) for _ in range(n)])
    if name == "jax":
        jax = require_module("jax")
        step = jax.jit(lambda tv, ntv, v: model.stateless_call(tv, ntv, v, training=True))
        tv, ntv = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
        outs = []
        for _ in range(n):
            out, ntv = step(tv, ntv, x)
            outs.append(np.asarray(out))
        return np.stack(outs)
    torch = require_module("torch")
    with torch.no_grad():
        return np.stack([keras.ops.convert_to_numpy(model(x, training=True)) for _ in range(n)])


def require_backend(name: str) -> None:
    """Skip (locally) or fail (when required) if ``name``'s framework is not importable (for ``tensorflow``: Keras
    and the framework it runs on)."""
    from mcu.backends import missing

    problem = missing(name)
    if problem is not None:
        if name in _required_backends():
            pytest.fail(f"backend {name!r} is required (MCU_REQUIRE_BACKENDS) but cannot run: {problem}")
        pytest.skip(problem)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require_backend(request.param)
    return request.param


@pytest.fixture
def models(backend: str):
    """The model zoo of the current backend (see tests/_models.py)."""
    from tests import _models

    return _models.zoo(backend)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
