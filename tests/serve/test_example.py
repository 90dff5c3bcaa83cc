"""examples/serve_fraud.py end to end: tiers on test traffic, no drift alarm on it, alarms on shifted traffic."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("sklearn") is None:
    pytest.skip('needs the serve extra and scikit-learn (pip install "mcu[serve,test]")', allow_module_level=True)

from tests.conftest import require_backend  # noqa: E402
from tests.test_examples import load_example  # noqa: E402


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_serve_fraud_tiers_and_drift_alarm(backend, capsys):
    """Seeded server, so the run is reproducible. 143 test requests: 3 drift windows of 40, none alarms (seen
    p-values 0.17-0.84 on the test uncertainties with seeds 0 and 1, both backends; alpha 0.01 each); the
    imputed traffic moves the uncertainties (seen p <= 3e-4 per window): at least 3 of its 4 windows alarm
    (the first mixes 23 calm examples) and the last one does. The automatic tier is at least 97% accurate
    (seen 100% torch, 97.7% Keras) and the shifted traffic sends more examples out of it."""
    require_backend(backend)
    example = load_example("serve_fraud")
    r = example.run(backend, seed=0, n_samples=30)
    assert r["calm_checks"] == 3 and r["calm_alarms"] == 0
    assert r["shift_checks"] == 4 and r["shift_alarms"] >= 3 and r["alarm_now"] == 1
    assert r["per_tier"]["auto"]["accuracy"] >= 0.97
    assert sum(t["count"] for t in r["per_tier"].values()) == 143
    calm_auto = r["per_tier"]["auto"]["count"] / 143
    assert r["shifted_tiers"]["auto"] / 143 < calm_auto
    assert r["example"]["predictions"][0]["tier"] in ("auto", "verify", "review")
    requests, calls = r["batches"]
    assert requests == 287 and calls < requests  # one-example requests were coalesced
    if backend == "torch":
        example.report(r)
        out = capsys.readouterr().out
        assert "mcu_drift_alarm = 1" in out and "auto" in out
