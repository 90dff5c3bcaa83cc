"""Keras on JAX or PyTorch without TensorFlow: ``mcu.sample``, ``mcu.predict`` and ``mcu.active.query`` run end
to end in a process where TensorFlow cannot be imported (hidden as if not installed: :mod:`tests._no_tensorflow`),
and nothing imports it. Each case runs in a subprocess (Keras picks its framework once, at import), so this
module runs in every test run, whatever ``KERAS_BACKEND`` the test process has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_module

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import json, sys
from tests import _no_tensorflow
_no_tensorflow.install()

import importlib.util
import numpy as np
import keras
import mcu
from mcu.core.info import backend_info, format_info
from tests.conftest import keras_training_passes

keras.utils.set_random_seed(0)
L = keras.layers
inputs = keras.Input((8,))
model = keras.Model(inputs, L.Dense(3)(L.Dropout(0.4)(L.Dense(32, activation="relu")(inputs))))
x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
pool = np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)
T = 200

a, info = mcu.sample(model, x, T, seed=1, return_info=True)
b = mcu.sample(model, x, T, seed=1)
c = mcu.sample(model, x, T, seed=2)
vectorized = mcu.sample(model, x, T, seed=1, strategy="vectorized")
keras.utils.set_random_seed(3)
oracle = keras_training_passes(keras, model, x, T)
p1 = mcu.predict(model, x, 100, seed=4)
p2 = mcu.predict(model, x, 100, seed=4)
q1 = mcu.active.query(model, pool, 4, heuristic="bald", n_samples=30, seed=5)
q2 = mcu.active.query(model, pool, 4, heuristic="bald", n_samples=30, seed=5)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


print(json.dumps({
    "keras": keras.backend.backend(),
    "tensorflow_modules": sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"),
    "tensorflow_spec": importlib.util.find_spec("tensorflow") is not None,
    "strategy": info.strategy, "reason": info.strategy_reason,
    "shape": list(a.shape),
    "same_seed": bool(np.array_equal(a, b)), "other_seed": bool(np.array_equal(a, c)),
    "vectorized_same": bool(np.array_equal(a, vectorized)),
    "spread": float(a.std(0).mean()), "oracle_spread": float(oracle.std(0).mean()),
    "mean_gap": float(np.abs(softmax(a).mean(0) - softmax(oracle).mean(0)).max()),
    "predict_same": bool(np.array_equal(p1.mean, p2.mean) and np.array_equal(p1.mutual_information,
                                                                              p2.mutual_information)),
    "predict_gap": float(np.abs(p1.mean - softmax(oracle).mean(0)).max()),
    "predict_mi_positive": bool((p1.mutual_information > 0).all()),
    "query_same": bool(np.array_equal(q1[0], q2[0]) and np.array_equal(q1[1], q2[1])),
    "query": [int(i) for i in q1[0]],
    "info": format_info(backend_info()),
}))
"""


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_sample_predict_and_query_without_tensorflow(framework):
    require_module("keras")
    require_module(framework)
    env = dict(os.environ, KERAS_BACKEND=framework, MCU_BLOCK_TENSORFLOW="1", PYTHONPATH=str(ROOT),
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("MCU_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["keras"] == framework
    assert out["tensorflow_modules"] == [] and not out["tensorflow_spec"]  # hidden, and nothing tried to load it
    assert out["shape"] == [200, 6, 3]
    assert out["same_seed"] and not out["other_seed"]
    # same seed, same samples, whichever full-pass strategy ran (auto picks loop or vectorized)
    assert out["strategy"] in ("loop", "vectorized") and out["vectorized_same"]
    assert "need Keras on TensorFlow" in out["reason"]
    # The literal recipe (training=True passes): T = 200 passes, 18 outputs averaged; the standard error of a
    # spread ratio is ~5% here, so 0.8-1.25 fails only on a wrong dropout rate or missing/extra dropout.
    assert 0.8 <= out["spread"] / out["oracle_spread"] <= 1.25
    # mean probabilities of two independent 200-sample (100 for predict) runs: per-entry standard deviation of
    # the difference is below 0.5 * sqrt(1/200 + 1/100) ~ 0.06 at worst; a deterministic model would be far off
    assert out["mean_gap"] < 0.2 and out["predict_gap"] < 0.25
    assert out["predict_same"] and out["predict_mi_positive"]
    assert out["query_same"] and len(set(out["query"])) == 4 and all(0 <= i < 20 for i in out["query"])
    # mcu info: TensorFlow absent, the Keras backend available on this framework
    assert "tensorflow  not installed" in out["info"] and f"keras on    {framework} " in out["info"]
    assert f"installed: tensorflow (Keras on {framework})" in out["info"]
    assert np.isfinite(out["spread"]) and out["spread"] > 0


def test_keras_on_tensorflow_without_tensorflow_is_a_clear_error():
    require_module("keras")
    script = r"""
from tests import _no_tensorflow
_no_tensorflow.install()
import mcu
from mcu.backends import get_backend
from mcu.core.info import backend_info, format_info
print(format_info(backend_info()))
try:
    get_backend("tensorflow")
except mcu.BackendNotInstalledError as exc:
    print("ERROR", exc)
"""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT))
    env.pop("MCU_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensorflow  not installed" in done.stdout and "installed: tensorflow" not in done.stdout
    error = done.stdout.split("ERROR ", 1)[1]
    assert "Keras runs on tensorflow (KERAS_BACKEND) but TensorFlow is not installed" in error
    assert 'pip install "mcu[tensorflow]"' in error and "KERAS_BACKEND=jax or torch" in error


@pytest.mark.parametrize("framework, fix", [("jax", 'pip install "mcu[keras]" "jax[cpu]"'),
                                            ("torch", 'pip install "mcu[keras,torch]"')])
def test_keras_on_a_missing_framework_says_what_to_install(monkeypatch, framework, fix):
    from mcu import backends

    monkeypatch.setattr(backends, "keras_backend", lambda: (framework, "KERAS_BACKEND"))
    monkeypatch.setattr(backends, "_found", lambda module: module != framework)
    assert backends.missing("tensorflow") == (f"Keras runs on {framework} (KERAS_BACKEND) but {framework} is not "
                                              f"installed: {fix}")
    monkeypatch.setattr(backends, "_found", lambda module: module != "tensorflow")  # TensorFlow is not needed
    assert backends.missing("tensorflow") is None
    monkeypatch.setattr(backends, "keras_backend", lambda: None)
    assert 'pip install "mcu[tensorflow]"' in backends.missing("tensorflow")
