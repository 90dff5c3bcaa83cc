"""mcu.serve.ray_deployment on a local Ray instance: two replicas answer over HTTP like ``mcu serve``.

Locally the module is skipped when Ray Serve is not installed; with ``MCU_REQUIRE_RAY=1`` (CI) a missing Ray
fails instead. Ray is shut down at the end of the module.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import numpy as np
import pytest

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
    if os.environ.get("MCU_REQUIRE_RAY") == "1":
        pytest.fail("MCU_REQUIRE_RAY=1 but ray[serve] is not installed: pip install \"mcu[ray]\"", pytrace=False)
    pytest.skip("ray[serve] is not installed (pip install \"mcu[ray]\")", allow_module_level=True)
if importlib.util.find_spec("starlette") is None:
    pytest.skip('the serve extra is not installed (pip install "mcu[serve]")', allow_module_level=True)

import httpx  # noqa: E402

import mcu  # noqa: E402
from tests.conftest import require_backend  # noqa: E402
from tests.serve import models  # noqa: E402
from tests.serve._server import free_port  # noqa: E402
from tests.serve.test_serve import assert_rows_equal, inputs, post_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = 10


@pytest.fixture(scope="module")
def ray_serve_url():
    require_backend("torch")
    import ray
    from ray import serve

    from mcu.serve import ray_deployment

    started = not ray.is_initialized()
    if started:
        pythonpath = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "ERROR"})
        app = ray_deployment("tests.serve.models:torch_classifier", num_replicas=2, num_cpus=0.5, n_samples=T,
                             seed=3, input_shape=[models.N_FEATURES], max_batch=16, max_wait_ms=20, max_examples=32)
        serve.run(app, name="mcu-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def test_replicas_answer_like_mcu_predict(ray_serve_url):
    from ray import serve

    x = inputs(6, seed=2)
    reference = mcu.predict(models.torch_classifier(), x, T, seed=3, batch_size=1)
    bodies = [{"inputs": x.tolist()}] + [{"inputs": inputs(1 + i % 3, seed=50 + i).tolist()} for i in range(39)]
    responses = asyncio.run(post_all(ray_serve_url, bodies))
    assert [r.status_code for r in responses] == [200] * 40
    assert_rows_equal(responses[0].json()["predictions"], reference)
    for body, response in zip(bodies, responses):
        assert len(response.json()["predictions"]) == len(body["inputs"])
    status = serve.status().applications["mcu-test"].deployments["mcu"]
    assert status.replica_states.get("RUNNING") == 2


def test_larger_than_a_batch_and_bad_input(ray_serve_url):
    x = inputs(20, seed=4)  # more than max_batch=16 examples: sampled alone
    response = httpx.post(f"{ray_serve_url}/v1/predict", json={"inputs": x.tolist()}, timeout=60)
    assert response.status_code == 200
    assert_rows_equal(response.json()["predictions"],
                      mcu.predict(models.torch_classifier(), x, T, seed=3, batch_size=1))
    bad = httpx.post(f"{ray_serve_url}/v1/predict", json={"inputs": [[1.0, 2.0]]})
    assert bad.status_code == 400 and "shape [4]" in bad.json()["error"]
    assert httpx.post(f"{ray_serve_url}/v1/predict", json={"inputs": [[0.0] * 4] * 33}).status_code == 413
    assert httpx.get(f"{ray_serve_url}/healthz").json() == {"status": "ok"}
    info = httpx.get(f"{ray_serve_url}/v1/model").json()
    assert info["backend"] == "torch" and info["n_samples"] == T and info["model"] == "model"
    assert np.isfinite(response.json()["predictions"][0]["mutual_information"])
