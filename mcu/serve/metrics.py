"""Prometheus metrics of one server (its own registry, so several apps in one process do not mix counts).

Exposed at ``GET /metrics`` in the Prometheus text format:

* ``mcu_requests_total{endpoint, status}`` and ``mcu_request_latency_seconds{endpoint}`` (histogram);
* ``mcu_batch_examples`` / ``mcu_batch_requests`` (histograms): examples and requests per sampling call;
* ``mcu_examples_total{tier}``: scored examples per triage tier (``tier="none"`` without thresholds);
* ``mcu_uncertainty{score}`` (histogram) of the score used for triage and drift;
* ``mcu_drift_statistic``, ``mcu_drift_p_value``, ``mcu_drift_effect_size``, ``mcu_drift_alarm`` (gauges of the
  last window test, alarm 0/1) and ``mcu_drift_checks_total`` / ``mcu_drift_alarms_total``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNCERTAINTY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class ServeMetrics:
    """The collectors of one server, in their own :class:`prometheus_client.CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mcu_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("mcu_request_latency_seconds", "Time from request to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_examples = Histogram("mcu_batch_examples", "Examples per sampling call",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("mcu_batch_requests", "Requests coalesced into one sampling call",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.scored = Counter("mcu_examples", "Examples scored, per triage tier", ["tier"], registry=r)
        self.uncertainty = Histogram("mcu_uncertainty", "Uncertainty score of the scored examples", ["score"],
                                     buckets=UNCERTAINTY_BUCKETS, registry=r)
        self.drift_statistic = Gauge("mcu_drift_statistic", "KS statistic of the last drift window test", registry=r)
        self.drift_p_value = Gauge("mcu_drift_p_value", "p-value of the last drift window test", registry=r)
        self.drift_effect = Gauge("mcu_drift_effect_size",
                                  "Wasserstein distance of the last window, in reference standard deviations",
                                  registry=r)
        self.drift_alarm = Gauge("mcu_drift_alarm", "1 if the last drift window test raised an alarm", registry=r)
        self.drift_checks = Counter("mcu_drift_checks", "Drift window tests run", registry=r)
        self.drift_alarms = Counter("mcu_drift_alarms", "Drift window tests that raised an alarm", registry=r)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, n_requests: int, n_examples: int) -> None:
        self.batch_requests.observe(n_requests)
        self.batch_examples.observe(n_examples)

    def examples(self, tiers: Sequence[Any], scores: np.ndarray, score: str) -> None:
        counts: dict[str, int] = {}
        for tier in tiers:
            key = "none" if tier is None else str(tier)
            counts[key] = counts.get(key, 0) + 1
        for tier, count in counts.items():
            self.scored.labels(tier).inc(count)
        histogram = self.uncertainty.labels(score)
        for value in scores.tolist():
            histogram.observe(value)

    def drift(self, check: Any) -> None:
        """Record one :class:`mcu.monitor.DriftCheck`."""
        self.drift_statistic.set(check.statistic)
        self.drift_p_value.set(check.p_value)
        self.drift_effect.set(check.effect_size)
        self.drift_alarm.set(1.0 if check.alarm else 0.0)
        self.drift_checks.inc()
        if check.alarm:
            self.drift_alarms.inc()

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
