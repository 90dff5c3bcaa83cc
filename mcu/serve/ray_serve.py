"""The same handler as a Ray Serve deployment: ``@serve.batch`` coalesces requests, replicas scale out.

Each replica loads the model once from a :class:`mcu.distributed.ModelSource` (the safe loaders of
``mcu.distributed``), owns a :class:`~mcu.serve.service.Service` and samples in ONE worker thread;
``@serve.batch`` (counting examples, not requests) groups concurrent requests into one
:meth:`Service.score <mcu.serve.service.Service.score>` call. Requests are answered by
:func:`mcu.serve.app.handle`, the code behind ``mcu serve``: the same checks, errors and JSON.

``/metrics`` is not served here: each replica would report only its own share. Ray Serve exports its own
request metrics (``ray_serve_*``) to Prometheus. The multi-node recipe is in the README ("Serve it").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from mcu.distributed.loading import ModelSource, load_model
from mcu.errors import InputError
from mcu.serve.app import handle
from mcu.serve.service import Service
from mcu.structured import rows

__all__ = ["MCUDeployment", "ray_deployment"]

#: the endpoints a replica answers
PATHS = ("/v1/predict", "/healthz", "/v1/model")


def _rows(items: list[np.ndarray]) -> int:
    return sum(rows(x) for x in items)


@serve.deployment(name="mcu")
class MCUDeployment:
    """One replica: the model, its :class:`Service`, one sampling thread. Built by :func:`ray_deployment`."""

    def __init__(self, source: ModelSource, options: dict[str, Any], max_batch: int, max_wait_s: float,
                 token: str | None, max_body_bytes: int) -> None:
        self.service = Service(load_model(source), max_batch=max_batch, **options)
        self.token, self.max_body_bytes = token, max_body_bytes
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mcu-sampling")
        self.score_batch.set_max_batch_size(max_batch)
        self.score_batch.set_batch_wait_timeout_s(max_wait_s)
        self.executor.submit(self.service.warm_up).result()

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_rows)
    async def score_batch(self, xs: list[np.ndarray]) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.service.score, xs)

    async def submit(self, x: np.ndarray) -> Any:
        if rows(x) > self.service.max_batch:  # @serve.batch refuses an item larger than a batch: run it alone
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.service.score, [x])
            return results[0]
        return await self.score_batch(x)

    async def __call__(self, request: Request) -> Response:
        return await handle(request, self.service, self.submit, token=self.token,
                            max_body_bytes=self.max_body_bytes, paths=PATHS)


def ray_deployment(
    model: Any,
    *,
    factory: Any = None,
    num_replicas: int = 2,
    num_cpus: float = 1.0,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    max_body_bytes: int = 16 * 2**20,
    token: str | None = None,
    **service_options: Any,
) -> Any:
    """A Ray Serve application answering ``/v1/predict``, ``/healthz`` and ``/v1/model`` like ``mcu serve``.

    Args:
        model: what :func:`mcu.distributed.predict` accepts: ``"package.module:function"``, a TorchScript or
            ``.keras`` file, a state_dict file with ``factory``, a picklable callable, or a model object.
        factory: builds the architecture for a state_dict file.
        num_replicas: replicas (each loads the model once and samples in one thread).
        num_cpus: CPUs reserved per replica.
        max_batch, max_wait_ms: ``@serve.batch`` limits, in examples and milliseconds.
        max_body_bytes, token: as in :func:`mcu.serve.create_app`.
        **service_options: :class:`~mcu.serve.service.Service` arguments (``n_samples``, ``task``, ``seed``,
            ``triage``, ``reference``, ...). A triage or reference *file* is read on each replica: give a path
            every node can read, or pass the loaded objects.

    Returns:
        A bound application for ``serve.run(app, route_prefix="/")``.

    Example::

        from ray import serve
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(ray_deployment("mypkg.models:build", n_samples=50, input_shape=[784]), route_prefix="/")
    """
    from mcu._checks import check_int

    check_int(num_replicas, "num_replicas", minimum=1)
    check_int(max_batch, "max_batch", minimum=1)
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus >= 0:
        raise InputError(f"num_cpus: expected a number >= 0, got {num_cpus!r}.")
    source = ModelSource.resolve(model, factory=factory)
    deployment = MCUDeployment.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus},
                                       max_ongoing_requests=max(100, 4 * max_batch))
    return deployment.bind(source, service_options, max_batch, max_wait_ms / 1000, token, max_body_bytes)
