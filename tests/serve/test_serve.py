"""mcu serve over real HTTP: a uvicorn server on a free loopback port, talked to with httpx.

Predictions equal ``mcu.predict`` for a configured seed, whatever they are batched with; hundreds of
concurrent requests are all answered; every bad input gets its 4xx and the server answers afterwards; the
token is enforced; ``/metrics`` parses and counts what was sent; shifted traffic raises the drift alarm.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip('the serve extra is not installed (pip install "mcu[serve]")', allow_module_level=True)

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import mcu  # noqa: E402
from mcu.serve import Service, create_app, save_reference  # noqa: E402
from mcu.triage import Triage, save_thresholds  # noqa: E402
from tests.conftest import require_backend  # noqa: E402
from tests.serve import models  # noqa: E402
from tests.serve._server import free_port, running  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = 20


def inputs(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=(n, models.N_FEATURES))).astype(np.float32)


def metric_samples(url: str, **headers: str) -> dict[tuple, float]:
    """``(sample name, sorted labels) -> value`` of the server's /metrics, parsed by prometheus_client."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def assert_rows_equal(rows: list[dict], reference: mcu.Prediction, tol: float = 1e-6) -> None:
    assert len(rows) == len(reference)
    assert [r["label"] for r in rows] == reference.label.tolist()
    np.testing.assert_allclose([r["probabilities"] for r in rows], reference.mean, rtol=tol, atol=tol)
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        np.testing.assert_allclose([r[name] for r in rows], getattr(reference, name), rtol=tol, atol=tol,
                                   err_msg=name)


async def post_all(url: str, bodies: list, **headers: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=b, headers=headers) for b in bodies))


# ------------------------------------------------------------------------------------------ predictions


def test_seeded_predictions_equal_mcu_predict_whatever_the_batch(backend):
    """A request of n examples equals ``mcu.predict(x, T, seed=seed, batch_size=1)``, alone or sent together
    with 15 other requests (coalesced into the same sampling calls)."""
    model = models.classifier(backend)
    x = inputs(5, seed=1)
    reference = mcu.predict(model, x, T, seed=7, batch_size=1)
    app = create_app(model, n_samples=T, seed=7, max_batch=64, max_wait_ms=50)
    with running(app) as server:
        alone = httpx.post(f"{server.url}/v1/predict", json={"inputs": x.tolist()}, timeout=60)
        assert alone.status_code == 200, alone.text
        body = alone.json()
        assert body["n_samples"] == T and body["model"] == "model"
        assert_rows_equal(body["predictions"], reference)
        others = [{"inputs": inputs(3, seed=100 + i).tolist()} for i in range(15)]
        together = asyncio.run(post_all(server.url, [{"inputs": x.tolist()}, *others]))
        assert all(r.status_code == 200 for r in together)
        assert_rows_equal(together[0].json()["predictions"], reference)
        one = httpx.post(f"{server.url}/v1/predict", json={"inputs": x[2].tolist()}).json()  # one example, unwrapped
        assert_rows_equal(one["predictions"], mcu.predict(model, x[2:3], T, seed=7, batch_size=1))
        info = httpx.get(f"{server.url}/v1/model").json()
    assert info["backend"] == backend and info["n_samples"] == T
    assert info["input_shape"] == (None if backend == "torch" else [models.N_FEATURES])  # Keras models know it
    assert info["strategies_chosen"]["1"] in ("loop", "vectorized", "prefix", "parallel")


def test_200_concurrent_requests_are_all_answered_in_shared_batches(backend):
    model = models.classifier(backend)
    app = create_app(model, n_samples=10, max_batch=32, max_wait_ms=20)
    sizes = [1 + i % 3 for i in range(200)]
    bodies = [{"inputs": inputs(n, seed=i).tolist()} for i, n in enumerate(sizes)]
    with running(app) as server:
        responses = asyncio.run(post_all(server.url, bodies))
        metrics = metric_samples(server.url)
    assert [r.status_code for r in responses] == [200] * 200
    for n, response in zip(sizes, responses):
        rows = response.json()["predictions"]
        assert len(rows) == n
        for row in rows:
            assert math.isclose(sum(row["probabilities"]), 1.0, rel_tol=1e-5)
            assert row["label"] == int(np.argmax(row["probabilities"]))
            assert 0 <= row["mutual_information"] <= row["predictive_entropy"] + 1e-9
            assert row["tier"] is None
    assert metrics[("mcu_requests_total", (("endpoint", "/v1/predict"), ("status", "200")))] == 200
    assert metrics[("mcu_examples_total", (("tier", "none"),))] == sum(sizes)
    assert metrics[("mcu_batch_examples_sum", ())] == sum(sizes)
    calls = metrics[("mcu_batch_requests_count", ())]
    assert metrics[("mcu_batch_requests_sum", ())] == 200
    assert calls < 200  # requests were coalesced: fewer sampling calls than requests
    assert metrics[("mcu_request_latency_seconds_count", (("endpoint", "/v1/predict"),))] == 200


def test_unseeded_batched_answers_follow_the_model():
    """Without a seed, examples share sampling calls; the answer is still the model's MC estimate: the mean
    probabilities of 16 batched examples lie within Monte Carlo error of a seeded T=2000 reference."""
    require_backend("torch")
    model = models.torch_classifier()
    x = inputs(16, seed=3)
    reference = mcu.predict(model, x, 2000, seed=0).mean
    with running(create_app(model, n_samples=400, max_batch=16, max_wait_ms=50)) as server:
        responses = asyncio.run(post_all(server.url, [{"inputs": row.tolist()} for row in x[:, None]]))
    got = np.array([r.json()["predictions"][0]["probabilities"] for r in responses])
    # sd of a mean of 400 probabilities <= 0.5/20 = 0.025 (plus 0.011 for the reference): 0.1 is > 3.6 sd
    np.testing.assert_allclose(got, reference, atol=0.1)


def test_regression_mean_std_interval_equal_mcu_predict():
    require_backend("torch")
    model = models.torch_regressor()
    x = inputs(4, seed=5)
    reference = mcu.predict(model, x, T, task="regression", seed=3, batch_size=1)
    low, high = reference.interval(0.95)
    with running(create_app(model, n_samples=T, task="regression", seed=3)) as server:
        rows = httpx.post(f"{server.url}/v1/predict", json={"inputs": x.tolist()}).json()["predictions"]
    np.testing.assert_allclose([r["mean"] for r in rows], reference.mean[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([r["std"] for r in rows], reference.std[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([r["interval"] for r in rows], np.stack([low[:, 0], high[:, 0]], 1), rtol=1e-6,
                               atol=1e-6)


def test_a_large_request_is_parsed_off_the_event_loop_and_answered():
    require_backend("torch")
    from mcu.serve.app import PARSE_INLINE_BYTES

    x = inputs(1000, seed=6)
    body = json.dumps({"inputs": x.tolist()}).encode()
    assert len(body) > PARSE_INLINE_BYTES
    with running(create_app(models.torch_classifier(), n_samples=5, seed=1)) as server:
        response = httpx.post(f"{server.url}/v1/predict", content=body, timeout=120)
        x[500, 2] = np.nan
        bad = httpx.post(f"{server.url}/v1/predict", content=json.dumps({"inputs": x.tolist()}).encode())
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1000
    assert bad.status_code == 400 and "NaN" in bad.json()["error"]


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def strict_server():
    require_backend("torch")
    app = create_app(models.torch_classifier(), n_samples=5, input_shape=[models.N_FEATURES], max_examples=5,
                     max_body_bytes=4000, max_wait_ms=1)
    with running(app) as server:
        yield server


GOOD = json.dumps({"inputs": [[0.1, 0.2, 0.3, 0.4]]}).encode()
BAD = {
    "non-JSON": (b"{inputs: [1, 2", 400, "body"),
    "not an object": (b"[[1, 2, 3, 4]]", 400, "body"),
    "missing inputs": (b'{"input": [[1, 2, 3, 4]]}', 400, "body"),
    "empty list": (b'{"inputs": []}', 400, "inputs"),
    "not a list": (b'{"inputs": 3}', 400, "inputs"),
    "named inputs": (b'{"inputs": {"a": [1, 2, 3, 4]}}', 400, "inputs"),
    "wrong shape": (b'{"inputs": [[1, 2, 3]]}', 400, "shape [4]"),
    "wrong rank": (b'{"inputs": [[[1, 2, 3, 4]]]}', 400, "inputs"),
    "ragged": (b'{"inputs": [[1, 2, 3, 4], [1, 2]]}', 400, "inputs"),
    "string": (b'{"inputs": [[1, 2, "3", 4]]}', 400, "inputs"),
    "boolean": (b'{"inputs": [[1, 2, true, 4]]}', 400, "boolean"),
    "null": (b'{"inputs": [[1, 2, null, 4]]}', 400, "inputs"),
    "NaN": (b'{"inputs": [[1, 2, NaN, 4]]}', 400, "NaN"),
    "infinity": (b'{"inputs": [[1, 2, -Infinity, 4]]}', 400, "infinite"),
    "overflow to inf": (b'{"inputs": [[1, 2, 1e999, 4]]}', 400, "infinite"),
    "beyond float32": (b'{"inputs": [[1, 2, 1e39, 4]]}', 400, "float32 range"),
    "beyond 64 bits": (b'{"inputs": [[1, 2, 100000000000000000000000, 4]]}', 400, "inputs"),
    "nested too deeply": (b'{"inputs": ' + b"[" * 1900 + b"]" * 1900 + b"}", 400, "nested"),  # < 4000 bytes
    "too many examples": (json.dumps({"inputs": [[0.0] * 4] * 6}).encode(), 413, "maximum is 5"),
    "body too large": (json.dumps({"inputs": [[0.123456789] * 4] * 300}).encode(), 413, "body"),
    "not UTF-8": (b'{"inputs": [[1, 2, 3, 4]], "\xff": 1}', 400, "body"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_4xx_naming_the_field_and_the_server_keeps_serving(strict_server, case):
    body, status, field = BAD[case]
    response = httpx.post(f"{strict_server.url}/v1/predict", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert field in response.json()["error"]
    assert httpx.post(f"{strict_server.url}/v1/predict", content=GOOD).status_code == 200


def test_chunked_body_too_large_is_refused(strict_server):
    def chunks():
        yield b'{"inputs": ['
        for _ in range(400):
            yield b"[0.1, 0.2, 0.3, 0.4],"
        yield b"[0.1, 0.2, 0.3, 0.4]]}"

    response = httpx.post(f"{strict_server.url}/v1/predict", content=chunks())  # no content-length
    assert response.status_code == 413 and "body" in response.json()["error"]


def test_unknown_path_and_method_are_json_errors(strict_server):
    assert httpx.get(f"{strict_server.url}/nope").status_code == 404
    response = httpx.get(f"{strict_server.url}/v1/predict")
    assert response.status_code == 405 and "POST" in response.json()["error"]


def test_bad_requests_are_counted(strict_server):
    before = metric_samples(strict_server.url)
    key = ("mcu_requests_total", (("endpoint", "/v1/predict"), ("status", "400")))
    httpx.post(f"{strict_server.url}/v1/predict", content=b"{}")
    assert metric_samples(strict_server.url)[key] == before.get(key, 0) + 1


def test_input_the_model_refuses_fails_alone_without_a_declared_shape():
    """Without ``input_shape`` (a torch model) the model itself refuses 3 features: that request gets 400,
    the valid requests batched with it are answered."""
    require_backend("torch")
    with running(create_app(models.torch_classifier(), n_samples=5, max_wait_ms=100)) as server:
        bodies = [{"inputs": [[1.0, 2.0, 3.0]]}] + [{"inputs": inputs(2, seed=i).tolist()} for i in range(5)]
        responses = asyncio.run(post_all(server.url, bodies))
        assert responses[0].status_code == 400
        assert "inputs: the model cannot process examples of shape [3]" in responses[0].json()["error"]
        assert [r.status_code for r in responses[1:]] == [200] * 5


# ------------------------------------------------------------------------------------------ access


def test_token_is_required_except_for_the_health_check():
    require_backend("torch")
    with running(create_app(models.torch_classifier(), n_samples=5, token="s3cret")) as server:
        url = f"{server.url}/v1/predict"
        missing = httpx.post(url, content=GOOD)
        assert missing.status_code == 401 and "authorization" in missing.json()["error"]
        assert missing.headers["www-authenticate"] == "Bearer"
        assert httpx.post(url, content=GOOD, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url, content=GOOD, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.post(url, content=GOOD, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


def test_graceful_shutdown_answers_the_request_in_flight():
    """The request waits 300 ms in the batcher for companions; the server is told to stop meanwhile."""
    require_backend("torch")
    app = create_app(models.torch_classifier(), n_samples=5, max_wait_ms=300)
    with running(app) as server:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            "response", httpx.post(f"{server.url}/v1/predict", content=GOOD, timeout=30)))
        thread.start()
        time.sleep(0.1)
        server.stop()
        thread.join(30)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["predictions"]) == 1


# ------------------------------------------------------------------------------------------ triage, drift


def test_tiers_metrics_and_a_drift_alarm_after_shifted_traffic(tmp_path, backend):
    """Thresholds and reference from validation data (seeded, so deterministic). 2 windows of 50
    in-distribution examples raise no alarm (checked: p-values 0.4-0.9 on both backends); then inputs scaled
    x6 (much more confident) raise it in the first shifted window."""
    model = models.classifier(backend)
    validation = mcu.predict(model, inputs(400, seed=10), T, seed=1)
    u = validation.predictive_entropy
    triage = Triage(tuple(np.quantile(u, [0.5, 0.9])))
    save_thresholds(tmp_path / "triage.json", triage, score="predictive_entropy")
    save_reference(tmp_path / "reference.json", u, score="predictive_entropy")
    app = create_app(model, n_samples=T, seed=2, triage=str(tmp_path / "triage.json"),
                     reference=str(tmp_path / "reference.json"), drift_window=50)
    with running(app) as server:
        url = f"{server.url}/v1/predict"
        rows = []
        for i in range(4):
            rows += httpx.post(url, json={"inputs": inputs(25, seed=20 + i).tolist()}).json()["predictions"]
        calm = metric_samples(server.url)
        for i in range(2):
            rows += httpx.post(url, json={"inputs": inputs(25, seed=30 + i, scale=6.0).tolist()}).json()["predictions"]
        shifted = metric_samples(server.url)
        info = httpx.get(f"{server.url}/v1/model").json()
    tiers = [r["tier"] for r in rows]
    assert set(tiers) <= {"auto", "verify", "review"} and len(set(tiers[:100])) == 3
    assert tiers == triage.route([r["predictive_entropy"] for r in rows]).tolist()
    assert calm[("mcu_drift_checks_total", ())] == 2 and calm[("mcu_drift_alarms_total", ())] == 0
    assert calm[("mcu_drift_alarm", ())] == 0
    assert shifted[("mcu_drift_checks_total", ())] == 3 and shifted[("mcu_drift_alarms_total", ())] == 1
    assert shifted[("mcu_drift_alarm", ())] == 1 and shifted[("mcu_drift_p_value", ())] < 0.01
    for tier in ("auto", "verify", "review"):
        assert shifted[("mcu_examples_total", (("tier", tier),))] == tiers.count(tier)
    assert shifted[("mcu_uncertainty_count", (("score", "predictive_entropy"),))] == 150
    assert info["triage"]["tiers"] == ["auto", "verify", "review"] and info["drift"]["alarms"] == 1


def test_score_names_must_agree(tmp_path):
    require_backend("torch")
    save_thresholds(tmp_path / "t.json", Triage((0.1,), ("auto", "review")), score="mutual_information")
    save_reference(tmp_path / "r.json", [0.1, 0.2, 0.3], score="predictive_entropy")
    with pytest.raises(mcu.InputError, match="score"):
        Service(models.torch_classifier(), triage=str(tmp_path / "t.json"), reference=str(tmp_path / "r.json"))


# ------------------------------------------------------------------------------------------ CLI, imports


def test_mcu_serve_command_line_serves_and_stops_on_sigint(tmp_path):
    require_backend("torch")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "SERVE_TOKEN": "t0ken"}
    command = [sys.executable, "-m", "mcu.cli", "serve", "tests.serve.models:torch_classifier", "--port", str(port),
               "--n-samples", "10", "--seed", "4", "--input-shape", "4", "--token-env", "SERVE_TOKEN",
               "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
            time.sleep(0.2)
        x = inputs(2, seed=9)
        response = httpx.post(f"{url}/v1/predict", json={"inputs": x.tolist()},
                              headers={"Authorization": "Bearer t0ken"})
        assert response.status_code == 200
        assert response.json()["model"] == "torch_classifier"
        assert_rows_equal(response.json()["predictions"],
                          mcu.predict(models.torch_classifier(), x, 10, seed=4, batch_size=1))
        assert httpx.post(f"{url}/v1/predict", json={"inputs": x.tolist()}).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, process.stderr.read().decode()


def test_mcu_serve_command_line_errors_exit_with_a_message(tmp_path, capsys, monkeypatch):
    from mcu.serve.cli import main

    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "model: expected an existing model file" in capsys.readouterr().err
    monkeypatch.delenv("MCU_TEST_NO_TOKEN", raising=False)
    assert main(["tests.serve.models:torch_classifier", "--token-env", "MCU_TEST_NO_TOKEN"]) == 2
    assert "MCU_TEST_NO_TOKEN" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tests.serve.models:torch_classifier", "--workers", "0"])


def test_importing_mcu_serve_imports_no_framework_nor_web_stack():
    code = ("import sys, mcu, mcu.serve; print(sorted({'ray', 'torch', 'tensorflow', 'starlette', 'uvicorn'} "
            "& set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
