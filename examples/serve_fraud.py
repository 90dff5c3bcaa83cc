"""Serve a classifier with uncertainty, triage tiers and drift monitoring: the reference guide's fraud service.

The guide's service answers each transaction with a prediction and a confidence; confident cases are
processed automatically, medium ones get a second check, uncertain ones go to a human; a shift in the
distribution of uncertainty raises an alarm. Here the bundled scikit-learn breast-cancer data (30 numeric
features, two classes) stands in for transactions, end to end:

1. train a small dropout classifier (``mcu.demo.models``);
2. on validation data: fit the tier thresholds (``mcu.triage.fit_thresholds``: at most 5% to human review,
   an automatic tier that made no mistake) and keep the uncertainties as the drift reference; save both
   as the JSON files ``mcu serve --triage/--reference`` read;
3. start the server (``mcu.serve.create_app`` under uvicorn, on a free loopback port; the same as
   ``mcu serve``) and send the test set as concurrent one-example requests: tiers and their accuracy;
4. send shifted traffic: the same test inputs after an upstream source went down, so that its 10 features
   (the "worst" measurements) arrive imputed with the training mean. The model is less sure: more checks and
   reviews, and the drift alarm on ``/metrics``. (Random noise on the inputs would not do: this classifier
   extrapolates noisy inputs confidently, a known limit of MC dropout.)

Run: python examples/serve_fraud.py [--backend torch|tensorflow] [--n-samples 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer

import mcu
from mcu.demo import models
from mcu.serve import create_app, save_reference
from mcu.triage import fit_thresholds, save_thresholds

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def data(seed: int = 0) -> dict[str, np.ndarray]:
    """Standardized features, split 50/25/25 into train, validation and test (stratified by shuffling)."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    n_train, n_val = len(x) // 2, len(x) // 4
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train : n_train + n_val],
            "y_val": y[n_train : n_train + n_val], "x_test": x[n_train + n_val :], "y_test": y[n_train + n_val :]}


class Server:
    """uvicorn in a thread on a free loopback port (what ``mcu serve`` does in its own process)."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True  # graceful: requests in flight are answered first
        self.thread.join(30)


async def send(url: str, x: np.ndarray, clients: int = 16) -> list[dict]:
    """One example per request, ``clients`` requests in flight at a time; answers in input order."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        gate = asyncio.Semaphore(clients)

        async def one(row: np.ndarray) -> dict:
            async with gate:
                response = await client.post("/v1/predict", json={"inputs": row.tolist()})
                response.raise_for_status()
                return response.json()["predictions"][0]

        return await asyncio.gather(*(one(row) for row in x))


def metrics(url: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


#: the features of the source that goes down in the shifted traffic ("worst" radius ... fractal dimension)
MISSING = slice(20, 30)


def run(backend: str = "torch", *, seed: int = 0, n_samples: int = 50, epochs: int = 60, drift_window: int = 40, folder: str | None = None) -> dict:
    """The whole scenario; returns what it printed as numbers (for tests)."""
    d = data(seed)
    with models.single_thread(backend):
        model = models.train_classifier(backend, d["x_train"], d["y_train"], 2, seed=seed, epochs=epochs)
        validation = mcu.predict(model, d["x_val"], n_samples, seed=seed)
    u_val = validation.predictive_entropy
    triage = fit_thresholds(u_val, validation.label == d["y_val"], target_review_rate=0.05,
                            target_auto_accuracy=1.0)
    folder = Path(folder or tempfile.mkdtemp(prefix="mcu-serve-fraud-"))
    save_thresholds(folder / "triage.json", triage, score="predictive_entropy")
    save_reference(folder / "reference.json", u_val, score="predictive_entropy")

    app = create_app(model, n_samples=n_samples, seed=seed, triage=str(folder / "triage.json"),
                     reference=str(folder / "reference.json"), drift_window=drift_window, name="fraud-demo")
    with models.single_thread(backend), Server(app) as server:
        example = httpx.post(f"{server.url}/v1/predict", json={"inputs": d["x_test"][0].tolist()}).json()
        calm = asyncio.run(send(server.url, d["x_test"]))
        after_calm = metrics(server.url)
        shifted_x = d["x_test"].copy()
        shifted_x[:, MISSING] = 0.0  # imputed with the training mean (the features are standardized)
        shifted = asyncio.run(send(server.url, shifted_x))
        after_shift = metrics(server.url)
        info = httpx.get(f"{server.url}/v1/model").json()

    correct = np.array([row["label"] for row in calm]) == d["y_test"]
    tiers = np.array([row["tier"] for row in calm])
    per_tier = {t: {"count": int((tiers == t).sum()),
                    "accuracy": float(correct[tiers == t].mean()) if (tiers == t).any() else float("nan")}
                for t in triage.tiers}
    return {
        "thresholds": triage.thresholds, "example": example, "per_tier": per_tier,
        "accuracy": float(correct.mean()), "shifted_tiers": Counter(row["tier"] for row in shifted),
        "calm_tiers": Counter(tiers.tolist()),
        "calm_alarms": after_calm.get("mcu_drift_alarms_total", 0.0),
        "calm_checks": after_calm.get("mcu_drift_checks_total", 0.0),
        "shift_alarms": after_shift["mcu_drift_alarms_total"] - after_calm.get("mcu_drift_alarms_total", 0.0),
        "shift_checks": after_shift["mcu_drift_checks_total"] - after_calm.get("mcu_drift_checks_total", 0.0),
        "alarm_now": after_shift["mcu_drift_alarm"], "p_value": after_shift["mcu_drift_p_value"],
        "batches": (after_shift["mcu_batch_requests_sum"], after_shift["mcu_batch_requests_count"]),
        "info": info, "folder": str(folder),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "tensorflow"], default=models.default_backend())
    parser.add_argument("--n-samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report(run(args.backend, seed=args.seed, n_samples=args.n_samples))


def report(r: dict) -> None:
    """Print what :func:`run` returned."""
    print(f"thresholds (predictive entropy, fitted on validation): {', '.join(f'{t:.4f}' for t in r['thresholds'])}"
          f" -> {r['folder']}/triage.json")
    print(f"one request: {r['example']}")
    print(f"\ntest traffic ({sum(t['count'] for t in r['per_tier'].values())} one-example requests, 16 in flight; "
          f"accuracy {r['accuracy']:.1%}):")
    for name, t in r["per_tier"].items():
        accuracy = "-" if np.isnan(t["accuracy"]) else f"{t['accuracy']:.1%}"
        print(f"  {name:7s} {t['count']:4d} requests, accuracy {accuracy}")
    print(f"  drift: {int(r['calm_checks'])} window tests, {int(r['calm_alarms'])} alarm(s)")
    print("\nshifted traffic (10 features imputed): " + ", ".join(f"{k} {v}" for k, v in sorted(r["shifted_tiers"].items())))
    print(f"  drift: {int(r['shift_checks'])} window tests, {int(r['shift_alarms'])} alarm(s); "
          f"mcu_drift_alarm = {r['alarm_now']:.0f} (last p-value {r['p_value']:.2g})")
    requests, calls = r["batches"]
    print(f"\n{int(requests)} requests answered in {int(calls)} sampling calls; "
          f"strategy per batch size: {r['info']['strategies_chosen']}")


if __name__ == "__main__":
    main()
