"""`mcu bench --serve` (mcu.bench.serve) in small: load generator, in-process servers, naive server, report."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util

import httpx
import numpy as np
import pytest

if importlib.util.find_spec("starlette") is None:
    pytest.skip('the serve extra is not installed (pip install "mcu[serve]")', allow_module_level=True)

from mcu.bench import serve as bench  # noqa: E402
from mcu.serve import create_app  # noqa: E402
from tests.conftest import require_backend  # noqa: E402
from tests.serve._server import running  # noqa: E402


def test_load_generator_and_naive_server_on_the_article_mlp(tmp_path):
    require_backend("torch")
    bodies = bench._bodies(8)
    rows = []
    for kind, app in (("mcu", create_app(bench.torch_mlp(), n_samples=5, input_shape=[784], max_batch=4)),
                      ("naive", bench.naive_app("torch", 5))):
        with running(app) as server:
            port = int(server.url.rsplit(":", 1)[1])
            row = asyncio.run(bench._load(port, 3, 4, 30.0, bench._requests(port, bodies), warm_up=3))
            answer = httpx.post(f"{server.url}/v1/predict", content=bodies[0]).json()["predictions"][0]
            if kind == "mcu":
                calls, examples = bench._batch_stats(server.url)
                assert examples == 3 + 12 + 1 and calls <= examples
        assert row["requests"] == 12 and row["rps"] > 0 and row["p50_ms"] <= row["p99_ms"]
        assert len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-5
        rows.append({**row, "backend": "torch", "server": kind, "concurrency": 16})
    results = {"rows": rows, "settings": {"n_samples": 5}, "targets": bench.targets(rows)}
    speedup = rows[0]["rps"] / rows[1]["rps"]
    assert np.isclose(results["targets"]["torch"]["speedup"], speedup)
    assert "| torch | naive | 16 |" in bench.markdown(results)
    assert bench.plot(results, tmp_path / "serve.png").stat().st_size > 10_000


def test_command_line_options_are_checked():
    args = bench.parser().parse_args(["--servers", "mcu,naive", "--concurrency", "1,8"])
    assert args.servers == ["mcu", "naive"] and args.concurrency == [1, 8]
    with pytest.raises(SystemExit, match="--servers"):
        bench.main(["--servers", "fast"])
    assert isinstance(args, argparse.Namespace)
