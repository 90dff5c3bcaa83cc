"""``mcu serve MODEL``: serve MC-dropout predictions over HTTP (uvicorn), or on Ray Serve with ``--ray``.

Examples:
    mcu serve mypkg.models:build --input-shape 784 --triage triage.json --reference reference.json
    mcu serve model.keras --n-samples 30 --port 9000 --token-env MCU_TOKEN
    mcu serve weights.pt --factory mypkg.models:build --seed 0
    mcu serve mypkg.models:build --ray --replicas 4 --ray-address auto
    mcu serve mypkg.models:build_bert --output logits --input-dtype input_ids=int64,attention_mask=int64
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from typing import Any, Sequence

__all__ = ["app_from_environment", "build_app", "main", "parser"]

#: the command line of a multi-worker server, for the worker processes (``--workers``)
ARGV_ENV = "MCU_SERVE_ARGV"


def _shape(text: str) -> list[int] | dict[str, list[int]]:
    if "=" in text:  # one shape per named input: input_ids=64,attention_mask=64 (dimensions joined by x)
        pairs = [part.partition("=") for part in text.split(",")]
        if any(not name.strip() or not dims.strip() for name, _, dims in pairs):
            raise argparse.ArgumentTypeError(f"expected name=shape pairs like input_ids=64,pixels=3x32x32, got {text!r}")
        return {name.strip(): _shape(dims) for name, _, dims in pairs}
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 784 or 3,32,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 784 or 3,32,32, got {text!r}")
    return values


def _output(text: str) -> str | int:
    """``--output``: an integer index, else a key or attribute name."""
    return int(text) if text.lstrip("-").isdigit() else text


def _dtypes(text: str) -> str | dict[str, str]:
    """``--input-dtype``: one dtype (``int64``) or one per named input (``input_ids=int64,attention_mask=int64``)."""
    from mcu.serve.service import INPUT_DTYPES

    if "=" not in text:
        if text not in INPUT_DTYPES:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(INPUT_DTYPES)} or name=dtype,..., got {text!r}")
        return text
    out: dict[str, str] = {}
    for part in text.split(","):
        name, _, dtype = part.partition("=")
        if not name.strip() or dtype.strip() not in INPUT_DTYPES:
            raise argparse.ArgumentTypeError(f"expected name=dtype pairs with dtypes among {', '.join(INPUT_DTYPES)}, "
                                             f"got {part!r}")
        out[name.strip()] = dtype.strip()
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcu serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", metavar="MODEL", help="package.module:function, a TorchScript .pt file, a state_dict "
                   "file with --factory, or a .keras file (loaded with mcu.distributed's safe loaders)")
    p.add_argument("--factory", metavar="MODULE:FUNCTION", help="builds the architecture for a state_dict file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--n-samples", type=int, default=50, metavar="T", help="stochastic passes per example (default 50)")
    p.add_argument("--task", choices=["classification", "regression"], default="classification")
    p.add_argument("--output", type=_output, metavar="KEY", help="what to sample when the model returns a "
                   "structure (a Hugging Face ModelOutput, a tuple, a dict): a key or attribute name (logits) or an "
                   "integer index")
    p.add_argument("--probabilities", action="store_true", help="the classifier outputs probabilities (default: "
                   "logits, softmax is applied)")
    p.add_argument("--seed", type=int, help="reproducible answers: each example sampled alone with a seed from "
                   "this and its position in its request (slower under load than batched sampling)")
    p.add_argument("--strategy", default="auto", help="sampling strategy (default auto)")
    p.add_argument("--input-shape", type=_shape, metavar="D,...", help="shape of one example, e.g. 784 or 1,28,28 "
                   "(inferred for Keras models), or one per named input: input_ids=64,attention_mask=64 (dimensions "
                   "joined by x: pixels=3x32x32); checked on every request")
    p.add_argument("--input-dtype", type=_dtypes, metavar="DTYPE", help="float32, float64, int32 or int64, or one "
                   "per named input: input_ids=int64,attention_mask=int64 (declares the names). Default: float32 for "
                   "an input array; for named inputs int64 when a request's values are all integers, else float32")
    p.add_argument("--max-batch", type=int, default=64, metavar="N", help="most examples per sampling call (64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a request may wait for others to share its sampling call (default 5)")
    p.add_argument("--max-examples", type=int, default=1024, metavar="N", help="most examples per request (1024)")
    p.add_argument("--max-body-mb", type=float, default=16.0, metavar="MB", help="largest request body (16 MB)")
    p.add_argument("--triage", metavar="FILE", help="thresholds JSON (mcu.triage.save_thresholds): adds tiers")
    p.add_argument("--reference", metavar="FILE", help="validation uncertainties for the drift monitor "
                   "(mcu.serve.save_reference JSON, a JSON list or a .npy file)")
    p.add_argument("--score", help="uncertainty used for tiers and drift (default: the files', else "
                   "predictive_entropy / std)")
    p.add_argument("--drift-window", type=int, default=200, metavar="N", help="examples per drift test (200)")
    p.add_argument("--drift-alpha", type=float, default=0.01, help="false-alarm rate per drift test (0.01)")
    p.add_argument("--token-env", metavar="NAME", help="require 'Authorization: Bearer <token>', the token read "
                   "from this environment variable")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model copy, "
                   "sampling thread and metrics (default 1)")
    p.add_argument("--threads", type=int, metavar="K", help="intra-op threads of torch / TensorFlow (default: "
                   "theirs; 1 often serves small models faster on a busy or small machine)")
    p.add_argument("--name", help="model name in responses (default: from MODEL)")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve (@serve.batch, --replicas replicas)")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (default 2)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local instance)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _service_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "n_samples": args.n_samples, "task": args.task, "from_logits": not args.probabilities, "seed": args.seed,
        "output": args.output,
        "strategy": args.strategy, "triage": args.triage, "reference": args.reference, "score": args.score,
        "drift_window": args.drift_window, "drift_alpha": args.drift_alpha, "input_shape": args.input_shape,
        "input_dtype": args.input_dtype, "max_examples": args.max_examples, "name": args.name or _name(args.model),
    }
    return options


def _name(model: str) -> str:
    return model.rsplit(":", 1)[-1] if ":" in model and not os.path.exists(model) else os.path.basename(model)


def _token(args: argparse.Namespace) -> str | None:
    if not args.token_env:
        return None
    from mcu.serve.app import token_from_env

    return token_from_env(args.token_env)


def build_app(argv: Sequence[str]) -> Any:
    """The ASGI app for a ``mcu serve`` command line (model loaded, files read)."""
    from mcu.distributed.loading import ModelSource, load_model
    from mcu.serve.app import create_app

    args = parser().parse_args(list(argv))
    token = _token(args)
    if args.threads:
        limit_threads(args.threads)
    model = load_model(ModelSource.resolve(args.model, factory=args.factory))
    if args.threads:
        limit_threads(args.threads)  # again: the framework is imported now
    if args.seed is None:
        fresh_global_seed()
    return create_app(model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      max_body_bytes=int(args.max_body_mb * 2**20), token=token, **_service_options(args))


def limit_threads(threads: int) -> None:
    """Size torch's and TensorFlow's intra-op thread pools (environment variables for what is not imported yet)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[name] = str(threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def fresh_global_seed() -> None:
    """Seed torch's global generator from OS entropy. Unseeded strategies that draw dropout masks from it would
    otherwise repeat the same stream in every worker process and after every restart (a factory that calls
    ``torch.manual_seed`` for its weights leaves the generator in the same state each time)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def app_from_environment() -> Any:
    """The app of a worker process of ``mcu serve --workers N`` (its command line is in ``MCU_SERVE_ARGV``)."""
    return build_app(json.loads(os.environ[ARGV_ENV]))


def _warn_if_public(host: str, token_env: str | None) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        print(f"mcu serve: listening on {host}, reachable from other machines"
              + ("" if token_env else "; without --token-env anyone who reaches it can use it"), file=sys.stderr)


def _run_ray(args: argparse.Namespace) -> int:
    import signal
    import threading

    import ray
    from ray import serve

    from mcu.serve.ray_serve import ray_deployment

    stop = threading.Event()
    for name in ("SIGINT", "SIGTERM"):  # set explicitly: a background job starts with SIGINT ignored
        signal.signal(getattr(signal, name), lambda *_: stop.set())
    ray.init(address=args.ray_address, logging_level="ERROR")
    serve.start(http_options={"host": args.host, "port": args.port})
    app = ray_deployment(args.model, factory=args.factory, num_replicas=args.replicas, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_body_bytes=int(args.max_body_mb * 2**20),
                         token=_token(args), **_service_options(args))
    try:
        serve.run(app, name="mcu", route_prefix="/")
        print(f"mcu serve: Ray Serve on http://{args.host}:{args.port} ({args.replicas} replicas); Ctrl-C stops",
              file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # replicas finish their requests in flight (Ray Serve's graceful shutdown)
        ray.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    for option, value, minimum in (("--workers", args.workers, 1), ("--replicas", args.replicas, 1),
                                   ("--max-batch", args.max_batch, 1), ("--n-samples", args.n_samples, 1),
                                   ("--port", args.port, 0), ("--threads", args.threads or 1, 1)):
        if value < minimum:
            raise SystemExit(f"{option}: expected an integer >= {minimum}, got {value}")
    _warn_if_public(args.host, args.token_env)
    from mcu.errors import MCUError

    try:
        if args.ray:
            return _run_ray(args)
        import uvicorn

        if args.workers > 1:  # each worker process builds its own app from the same command line
            _token(args)  # fail here, not in every worker
            os.environ[ARGV_ENV] = json.dumps(argv)
            uvicorn.run("mcu.serve.cli:app_from_environment", factory=True, host=args.host, port=args.port,
                        workers=args.workers, log_level=args.log_level)
        else:
            uvicorn.run(build_app(argv), host=args.host, port=args.port, log_level=args.log_level)
    except MCUError as exc:
        print(f"mcu serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
