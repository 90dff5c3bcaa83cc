"""The ASGI app: ``POST /v1/predict``, ``GET /healthz``, ``GET /v1/model``, ``GET /metrics`` (Starlette).

:func:`handle` answers one request given a :class:`~mcu.serve.service.Service` and a ``submit`` coroutine
(the micro-batcher here, ``@serve.batch`` in the Ray Serve deployment), so both engines run the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mcu.errors import InputError
from mcu.serve.batching import MicroBatcher
from mcu.serve.metrics import CONTENT_TYPE
from mcu.serve.service import RequestError, Service

__all__ = ["create_app", "handle"]

#: path -> (method, endpoint label)
ENDPOINTS = {"/v1/predict": "POST", "/healthz": "GET", "/v1/model": "GET", "/metrics": "GET"}
#: answered without a token (liveness probes)
OPEN = ("/healthz",)
#: bodies up to this size are parsed on the event loop (small: parsing them is cheaper than a thread hop)
PARSE_INLINE_BYTES = 64 * 1024

Submit = Callable[[np.ndarray], Awaitable[Any]]


def create_app(
    model: Any,
    *,
    n_samples: int = 50,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    max_body_bytes: int = 16 * 2**20,
    token: str | None = None,
    warm_up: bool = True,
    **service_options: Any,
) -> Starlette:
    """An ASGI app serving MC-dropout predictions of ``model`` (mount it, or run it with uvicorn).

    Args:
        model: a PyTorch or Keras model with dropout, or a :class:`~mcu.serve.service.Service`.
        n_samples: ``T`` per example.
        max_batch: most examples per sampling call; concurrent requests are coalesced up to this.
        max_wait_ms: how long the oldest waiting request may wait for companions.
        max_body_bytes: larger request bodies get 413.
        token: if set, every endpoint but ``/healthz`` requires ``Authorization: Bearer <token>`` (else 401).
        warm_up: probe the sampling strategy for the batch sizes at startup (when the input shape is known).
        **service_options: the other :class:`~mcu.serve.service.Service` arguments (``task``, ``seed``,
            ``triage``, ``reference``, ``output``, ``input_shape``, ``input_dtype``, ``max_examples``, ...).

    Example::

        app = create_app(model, n_samples=50, triage="triage.json", reference="reference.json")
        uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    if isinstance(model, Service):
        if service_options:
            raise InputError(f"service_options: not used with a Service, got {sorted(service_options)}.")
        service = model
    else:
        service = Service(model, n_samples=n_samples, max_batch=max_batch, **service_options)
    if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
        raise InputError(f"max_wait_ms: expected a number >= 0, got {max_wait_ms!r}.")
    if token is not None and (not isinstance(token, str) or not token):
        raise InputError("token: expected a non-empty string or None.")
    batcher = MicroBatcher(service.score, max_batch=service.max_batch, max_wait=max_wait_ms / 1000)

    async def endpoint(request: Request) -> Response:
        return await handle(request, service, batcher.submit, token=token, max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        if warm_up:
            await asyncio.get_running_loop().run_in_executor(batcher.executor, service.warm_up)
        service.ready = True
        yield
        await batcher.stop()  # after uvicorn has answered the requests in flight

    routes = [Route(path, endpoint, methods=[method]) for path, method in ENDPOINTS.items()]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.service, app.state.batcher = service, batcher
    return app


async def handle(request: Request, service: Service, submit: Submit, *, token: str | None = None,
                 max_body_bytes: int = 16 * 2**20, paths: Sequence[str] = tuple(ENDPOINTS)) -> Response:
    """Answer one request to one of ``paths``; records its count and latency in ``service.metrics``."""
    start = time.perf_counter()
    path = request.url.path.rstrip("/") or "/"
    endpoint = path if path in paths else "other"
    try:
        response = await _answer(request, path, service, submit, token, max_body_bytes, paths)
    except RequestError as exc:
        response = JSONResponse({"error": exc.message}, status_code=exc.status,
                                headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
    except ClientDisconnect:
        response = JSONResponse({"error": "body: the client disconnected"}, status_code=400)
    except Exception as exc:  # noqa: BLE001 - a bug must not take the server down; the client is told
        response = JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
    service.metrics.request(endpoint, response.status_code, time.perf_counter() - start)
    return response


async def _answer(request: Request, path: str, service: Service, submit: Submit, token: str | None,
                  max_body_bytes: int, paths: Sequence[str]) -> Response:
    if path not in paths:
        raise RequestError(404, f"path: {path!r} not found; expected one of {', '.join(paths)}.")
    if request.method != ENDPOINTS[path]:
        raise RequestError(405, f"method: {path} expects {ENDPOINTS[path]}, got {request.method}.")
    if token is not None and path not in OPEN:
        _check_token(request, token)
    if path == "/healthz":
        return JSONResponse({"status": "ok" if service.ready else "starting"}, status_code=200 if service.ready
                            else 503)
    if path == "/v1/model":
        return JSONResponse(service.info())
    if path == "/metrics":
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)
    body = await _read_body(request, max_body_bytes)
    # a large body is parsed in a thread, so that the event loop keeps answering the others meanwhile
    x = service.parse(body) if len(body) < PARSE_INLINE_BYTES else await asyncio.to_thread(service.parse, body)
    result = await submit(x)
    if isinstance(result, RequestError):
        raise result
    return JSONResponse({"predictions": result, "n_samples": service.n_samples, "model": service.name})


def _check_token(request: Request, token: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(401, "authorization: expected the header 'Authorization: Bearer <token>' with the "
                                "server's token." + ("" if header else " (none was sent)"))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body: {int(declared)} bytes; the maximum is {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body: more than {limit} bytes; the maximum is {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"path: {request.url.path!r} not found; expected one of "
                                  f"{', '.join(ENDPOINTS)}."}, status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    path = request.url.path.rstrip("/")
    return JSONResponse({"error": f"method: {path} expects {ENDPOINTS.get(path, '?')}, got {request.method}."},
                        status_code=405)


def token_from_env(name: str) -> str:
    """The bearer token read from the environment variable ``name`` (``--token-env``)."""
    value = os.environ.get(name, "")
    if not value:
        raise InputError(f"token_env: the environment variable {name!r} is not set or empty; expected the token.")
    return value
