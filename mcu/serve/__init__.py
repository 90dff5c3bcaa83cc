"""Uncertainty-aware inference over HTTP: micro-batched MC dropout, triage tiers, drift metrics, Ray Serve.

* :func:`create_app` — an ASGI app (Starlette) with ``POST /v1/predict``, ``GET /healthz``, ``GET /v1/model``
  and ``GET /metrics`` (Prometheus); run it with uvicorn or mount it in your own service. ``mcu serve MODEL``
  starts it from the command line.
* :class:`Service` — the framework-free core: request checks, batched scoring through :func:`mcu.predict`,
  triage (:func:`mcu.triage.save_thresholds` files) and the drift monitor (:func:`save_reference` files).
* :func:`ray_deployment` — the same handler as a Ray Serve deployment with ``@serve.batch`` and replicas.

Needs ``pip install "mcu[serve]"`` (Ray Serve: ``"mcu[serve,ray]"``). Importing this package imports neither
a web framework nor a deep-learning framework.

Example:
    >>> import mcu.serve
    >>> sorted(mcu.serve.__all__)
    ['RequestError', 'Service', 'create_app', 'load_reference', 'ray_deployment', 'save_reference']
"""

from __future__ import annotations

from mcu._lazy import lazy_attributes

__all__ = ["RequestError", "Service", "create_app", "load_reference", "ray_deployment", "save_reference"]

_LAZY = {
    "create_app": "mcu.serve.app",
    "ray_deployment": "mcu.serve.ray_serve",
    "RequestError": "mcu.serve.service",
    "Service": "mcu.serve.service",
    "load_reference": "mcu.serve.service",
    "save_reference": "mcu.serve.service",
}
_EXTRAS = {"starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve", "ray": "ray"}


__getattr__, __dir__ = lazy_attributes("mcu.serve", _LAZY, _EXTRAS, globals())
