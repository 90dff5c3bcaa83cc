"""``mcu bench --serve`` / ``python -m mcu.bench.serve``: HTTP load on ``mcu serve`` and on a naive server.

Both servers run the article's MLP (784-512-10, Dropout 0.5) in their own process on a loopback port and
answer one example per request with T = 50 samples:

* **mcu serve**: the real command (``mcu serve mcu.bench.serve:torch_mlp ...``): micro-batching, one
  sampling thread, the fastest exact strategy.
* **mcu serve --seed 0**: the same with a configured seed: each example sampled alone (no shared passes);
* **naive**: the article's way: one request at a time, the model in training mode, T eager forward passes
  per request (PyTorch ``model.train()`` + a loop; Keras ``model(x, training=True)`` in a loop).

The load generator (asyncio keep-alive HTTP/1.1 connections sending pre-encoded requests, this process;
lighter than httpx so that it takes little CPU from the servers on a small machine) runs ``c`` clients at each concurrency level; each client
sends requests back to back until it has sent ``--requests-per-client`` or ``--seconds`` have passed
(after a short warm-up). Reported: requests/s, p50/p95/p99 latency, and for mcu the mean examples per
sampling call (from its ``/metrics``). Targets (issue 18), at 16 clients: p99 <= 100 ms and throughput
>= 5x the naive server's, for each backend.

Examples:
    mcu bench --serve                                   # both backends, concurrency 1,4,16,64
    mcu bench --serve --backend torch --concurrency 16 --seconds 5
    mcu bench --serve --out bench-results
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the directory holding mcu (a checkout or site-packages)
HOST = "127.0.0.1"  # loopback only
TARGET_CONCURRENCY, TARGET_P99_MS, TARGET_SPEEDUP = 16, 100.0, 5.0
LABELS = {"mcu": "mcu serve", "mcu-seeded": "mcu serve --seed", "naive": "naive"}


# ------------------------------------------------------------------------------------------ the model


def torch_mlp() -> Any:
    """The article's MCNet (784-512-10, Dropout 0.5), fixed weights."""
    from mcu.bench.workloads import WORKLOADS

    return WORKLOADS["mlp"].build("torch", seed=0).eval()


def keras_mlp() -> Any:
    from mcu.bench.workloads import WORKLOADS

    return WORKLOADS["mlp"].build("tensorflow", seed=0)


FACTORIES = {"torch": "mcu.bench.serve:torch_mlp", "tensorflow": "mcu.bench.serve:keras_mlp"}


# ------------------------------------------------------------------------------------------ the naive server


def naive_app(backend: str, n_samples: int) -> Any:
    """The article's service: the handler runs T training-mode passes inline, so requests go one at a time."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    model = torch_mlp() if backend == "torch" else keras_mlp()
    if backend == "torch":
        import torch

        def passes(x: np.ndarray) -> np.ndarray:
            model.train()  # the article's switch: every layer in training mode
            with torch.no_grad():
                xt = torch.from_numpy(x)
                return np.stack([torch.softmax(model(xt), -1).numpy() for _ in range(n_samples)])
    else:
        import tensorflow as tf

        def passes(x: np.ndarray) -> np.ndarray:
            return np.stack([tf.nn.softmax(model(x, training=True)).numpy() for _ in range(n_samples)])

    async def predict(request: Request) -> JSONResponse:
        x = np.asarray((await request.json())["inputs"], dtype=np.float32).reshape(-1, 784)
        probs = passes(x)  # blocks the event loop: one request at a time
        mean = probs.mean(0)
        entropy = -(mean * np.log(np.clip(mean, 1e-12, 1))).sum(-1)
        expected = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(-1).mean(0)
        return JSONResponse({"predictions": [
            {"label": int(m.argmax()), "probabilities": m.tolist(), "predictive_entropy": float(h),
             "mutual_information": float(h - e)} for m, h, e in zip(mean, entropy, expected)]})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/predict", predict, methods=["POST"]), Route("/healthz", healthz)])


def _serve_naive(backend: str, port: int, n_samples: int, threads: int | None) -> int:
    import uvicorn

    from mcu.serve.cli import limit_threads

    if threads:
        limit_threads(threads)
    app = naive_app(backend, n_samples)
    if threads:
        limit_threads(threads)

    # a long keep-alive: while the loop is blocked by a slow request, the idle timers of the other connections
    # expire, and uvicorn would close them as soon as the loop runs again
    uvicorn.run(app, host=HOST, port=port, log_level="warning", timeout_keep_alive=600)
    return 0


# ------------------------------------------------------------------------------------------ servers


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a loopback port; stopped with SIGINT (graceful), killed if it hangs."""

    def __init__(self, kind: str, backend: str, args: argparse.Namespace) -> None:
        self.kind, self.port = kind, _free_port()
        self.url = f"http://{HOST}:{self.port}"
        if kind in ("mcu", "mcu-seeded"):
            command = [sys.executable, "-m", "mcu.cli", "serve", FACTORIES[backend], "--host", HOST, "--port",
                       str(self.port), "--n-samples", str(args.n_samples), "--input-shape", "784",
                       "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                       "--log-level", "warning"] + (["--seed", "0"] if kind == "mcu-seeded" else [])
        else:
            command = [sys.executable, "-m", "mcu.bench.serve", "--naive-server", backend, "--port", str(self.port),
                       "--n-samples", str(args.n_samples)]
        if args.threads:  # the same thread setting for both servers
            command += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.kind} server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ------------------------------------------------------------------------------------------ load


def _bodies(n: int, seed: int = 0) -> list[bytes]:
    x = np.random.default_rng(seed).random((n, 784), dtype=np.float32)
    return [json.dumps({"inputs": row.tolist()}).encode() for row in x]


class _Connection:
    """A keep-alive HTTP/1.1 connection sending pre-encoded POSTs: a load generator that costs the 2-core machine
    ~0.1 ms of CPU per request (httpx's client costs several times more, taken from the servers under test)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "_Connection":
        return cls(*await asyncio.open_connection(HOST, port))

    async def post(self, request: bytes) -> int:
        self.writer.write(request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise RuntimeError("the server closed the connection before answering") from None
        status = int(head[9:12])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def _requests(port: int, bodies: list[bytes]) -> list[bytes]:
    return [(f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in bodies]


async def _load(port: int, concurrency: int, per_client: int, seconds: float, requests: list[bytes],
                warm_up: int) -> dict[str, Any]:
    connections = [await _Connection.open(port) for _ in range(concurrency)]
    try:
        async def one(connection: _Connection, i: int) -> float:
            start = time.perf_counter()
            status = await connection.post(requests[i % len(requests)])
            if status != 200:
                raise RuntimeError(f"HTTP {status} from the server under test")
            return time.perf_counter() - start

        for k in range(0, warm_up, concurrency):  # connections used once, strategies probed
            await asyncio.gather(*(one(c, k + j) for j, c in enumerate(connections)))
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def client_loop(c: int) -> None:
            for k in range(per_client):  # bounded: per_client requests or the deadline
                if time.perf_counter() > deadline:
                    return
                latencies.append(await one(connections[c], c * per_client + k))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        for connection in connections:
            connection.close()
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99))}


def _batch_stats(url: str) -> tuple[float, float]:
    """(sampling calls, examples) so far, from mcu serve's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for s in f.samples if s.name in ("mcu_batch_examples_count", "mcu_batch_examples_sum")}
    return values.get("mcu_batch_examples_count", 0.0), values.get("mcu_batch_examples_sum", 0.0)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    bodies = _bodies(512)
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "naive_server"},
                               "rows": []}
    for backend in args.backends:
        for kind in args.servers:
            server = Server(kind, backend, args)
            try:
                server.wait_ready()
                for c in args.concurrency:
                    before = _batch_stats(server.url) if kind != "naive" else None
                    row = asyncio.run(_load(server.port, c, args.requests_per_client, args.seconds,
                                            _requests(server.port, bodies), warm_up=max(c, 8)))
                    row.update(backend=backend, server=kind)
                    if before is not None:
                        calls, examples = (a - b for a, b in zip(_batch_stats(server.url), before))
                        row["mean_batch"] = examples / calls if calls else None  # warm-up included
                    results["rows"].append(row)
                    log(_line(row))
            finally:
                server.stop()
    results["targets"] = targets(results["rows"])
    return results


def targets(rows: list[dict]) -> dict[str, dict]:
    """The issue's targets per backend at 16 clients."""
    out = {}
    for backend in sorted({r["backend"] for r in rows}):
        at = {r["server"]: r for r in rows if r["backend"] == backend and r["concurrency"] == TARGET_CONCURRENCY}
        if "mcu" in at and "naive" in at:
            speedup = at["mcu"]["rps"] / at["naive"]["rps"]
            out[backend] = {"p99_ms": at["mcu"]["p99_ms"], "speedup": speedup,
                            "p99_ok": at["mcu"]["p99_ms"] <= TARGET_P99_MS, "speedup_ok": speedup >= TARGET_SPEEDUP}
    return out


def _line(row: dict) -> str:
    batch = f", mean batch {row['mean_batch']:.1f}" if row.get("mean_batch") else ""
    return (f"{row['backend']:10s} {row['server']:10s} c={row['concurrency']:3d}: {row['rps']:8.1f} req/s  "
            f"p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  "
            f"({row['requests']} requests{batch})")


def markdown(results: dict[str, Any]) -> str:
    lines = ["| backend | server | clients | req/s | p50 ms | p95 ms | p99 ms | requests | mean batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        batch = f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "-"
        lines.append(f"| {r['backend']} | {r['server']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests']} | {batch} |")
    for backend, t in results["targets"].items():
        lines.append(f"\n{backend}, {TARGET_CONCURRENCY} clients: p99 {t['p99_ms']:.1f} ms "
                     f"({'meets' if t['p99_ok'] else 'MISSES'} <= {TARGET_P99_MS:.0f} ms), throughput "
                     f"{t['speedup']:.1f}x the naive server ({'meets' if t['speedup_ok'] else 'MISSES'} "
                     f">= {TARGET_SPEEDUP:.0f}x)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in sorted({r["backend"] for r in results["rows"]}):
        for kind, style in (("mcu", "-o"), ("mcu-seeded", "-.^"), ("naive", "--s")):
            rows = [r for r in results["rows"] if r["backend"] == backend and r["server"] == kind]
            if not rows:
                continue
            c = [r["concurrency"] for r in rows]
            label = f"{LABELS[kind]} ({backend})"
            ax_rps.plot(c, [r["rps"] for r in rows], style, label=label)
            ax_p99.plot(c, [r["p99_ms"] for r in rows], style, label=label)
    ax_p99.axhline(TARGET_P99_MS, color="grey", lw=0.8, ls=":")
    levels = sorted({r["concurrency"] for r in results["rows"]})
    for ax, title in ((ax_rps, "throughput (requests/s)"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    ax_rps.legend(fontsize=8)
    fig.suptitle(f"MLP 784-512-10, one example per request, T = {results['settings']['n_samples']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcu bench --serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backend", default="all", help="torch | tensorflow | all installed (default)")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64], metavar="C,...", help="clients (1,4,16,64)")
    p.add_argument("--requests-per-client", type=int, default=40, metavar="K", help="at most K requests per client")
    p.add_argument("--seconds", type=float, default=8.0, help="at most this long per level (after the warm-up)")
    p.add_argument("--servers", type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
                   default=["mcu", "mcu-seeded", "naive"], metavar="LIST",
                   help="mcu (batched), mcu-seeded (--seed 0: each example sampled alone), naive (default: all)")
    p.add_argument("--n-samples", type=int, default=50, metavar="T", help="samples per example (50)")
    p.add_argument("--max-batch", type=int, default=64, help="mcu serve --max-batch (64)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="mcu serve --max-wait-ms (2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both servers (default 1; 0: the "
                   "framework's default)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for serve.json and serve.png")
    p.add_argument("--naive-server", metavar="BACKEND", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.naive_server:
        return _serve_naive(args.naive_server, args.port, args.n_samples, args.threads)
    installed = [b for b in ("torch", "tensorflow") if importlib.util.find_spec(b) is not None]
    args.backends = installed if args.backend == "all" else [args.backend]
    unknown = set(args.servers) - {"mcu", "mcu-seeded", "naive"}
    if unknown:
        raise SystemExit(f"--servers: unknown {sorted(unknown)}; expected some of mcu, mcu-seeded, naive")
    if not args.backends or not set(args.backends) <= set(installed):
        raise SystemExit(f"--backend: expected torch, tensorflow or all installed ({installed}), got {args.backend!r}")
    print(f"mcu serve vs naive: {', '.join(args.backends)}, clients {args.concurrency}, T={args.n_samples}, "
          f"load {os.getloadavg()[0]:.2f} (1-min) before the run", flush=True)
    results = run(args, log=lambda line: print(line, flush=True))
    results["load_after"] = os.getloadavg()
    text = markdown(results)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "serve.md").write_text(text + "\n")
    print(f"\nwrote {args.out / 'serve.json'}, {args.out / 'serve.md'}, {plot(results, args.out / 'serve.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
