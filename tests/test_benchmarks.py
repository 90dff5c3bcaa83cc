"""Smoke test of the benchmark suite (``mcu bench``): a tiny run end to end on both backends.

One workload, N=8, T=4, one repeat; an unregistered strategy name must come back as FAILED rows (on both
backends) while everything else still runs and the JSON, CSV, PNG and Markdown files are written.
"""

from __future__ import annotations

import csv
import json

from tests.conftest import require_backend, require_module


def test_bench_smoke(tmp_path, capsys):
    require_backend("torch")
    require_backend("tensorflow")
    from mcu.bench.cli import main

    out = tmp_path / "results"
    code = main([
        "--backend", "all", "--workloads", "mlp", "--n", "8", "--t", "4", "--repeats", "1",
        "--strategies", "loop,vectorized,no-such-strategy", "--precisions", "fp32,bf16",
        "--externals", "article-loop", "--memory-cases", "8,4", "--memory-strategies", "vectorized",
        "--memory-precisions", "fp32",
        "--precision-case", "8,4", "--convergence-t", "2,4", "--convergence-seeds", "2", "--convergence-n", "4",
        "--out", str(out), "--markdown", str(tmp_path / "RESULTS.md"), "--no-progress",
    ])
    assert code == 0

    results = json.loads((out / "results.json").read_text())
    timing = results["timing"]
    assert {r["backend"] for r in timing} == {"torch", "tensorflow"}
    for backend in ("torch", "tensorflow"):
        rows = {(r["strategy"], r["precision"], r["kind"]): r for r in timing if r["backend"] == backend}
        loop = rows[("loop", "fp32", "mcu")]
        assert loop["status"] == "ok" and loop["speedup"] == 1.0 and loop["median_s"] > 0
        assert rows[("vectorized", "fp32", "mcu")]["status"] == "ok"
        failed = rows[("no-such-strategy", "fp32", "mcu")]
        assert failed["status"] == "FAILED" and "no-such-strategy" in failed["error"]
        assert any(r["kind"] == "external" and r["status"] == "ok" for r in rows.values())  # the article's loop
        assert results["backends"][backend]["threads"]
    assert {r["backend"] for r in results["memory"] if r["status"] == "ok" and r["peak_mb"] > 0} == {"torch", "tensorflow"}
    assert any(r["precision"] == "bf16" and r["status"] == "ok" for r in results["precision"])
    assert {r["t"] for r in results["convergence"]} == {2, 4}
    assert results["meta"]["machine"]["cores"] >= 1

    with (out / "timing.csv").open() as f:
        assert {row["backend"] for row in csv.DictReader(f)} == {"torch", "tensorflow"}
    for name in ("memory.csv", "precision.csv", "convergence.csv", "speedup.png", "memory.png", "convergence.png"):
        assert (out / name).stat().st_size > 0, name
    assert "FAILED[" in (tmp_path / "RESULTS.md").read_text()
    printed = capsys.readouterr().out
    assert "Timing" in printed and "FAILED[" in printed and "no-such-strategy" in printed
    assert "Dense-layer throughput" not in printed and "peak" not in results  # only with a transformer workload


def test_python_m_benchmarks_runs_mcu_bench():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    outputs = [subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, cwd=root,
                              env=env, check=True).stdout for command in (["benchmarks"], ["mcu.cli", "bench"])]
    assert outputs[0].startswith("usage: mcu bench") and outputs[0] == outputs[1]


def test_page_faults_script_reports_time_and_faults_per_call(capsys):
    require_backend("torch")
    import pytest

    from benchmarks.page_faults import main

    main(["--workload", "mlp", "--n", "2", "--t", "5", "--strategy", "prefix", "--calls", "3"])
    line = capsys.readouterr().out
    assert "mlp N=2 T=5 prefix:" in line and "ms/call" in line and "minor page faults/call" in line
    with pytest.raises(SystemExit):
        main(["--workload", "no-such-workload"])


def test_first_call_memory_script_measures_each_configuration_in_fresh_processes(tmp_path, capsys):
    require_backend("torch")
    import os
    import shutil
    import subprocess

    import pytest

    from benchmarks.first_call_memory import main

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = tmp_path / "other"  # a second checkout: here, its mcu changed to one that fails visibly
    shutil.copytree(os.path.join(here, "mcu"), other / "mcu")
    shutil.copytree(os.path.join(here, "benchmarks"), other / "benchmarks")
    (other / "mcu" / "__init__.py").write_text("raise ImportError('the other checkout')\n")
    with pytest.raises(subprocess.CalledProcessError):  # its child cannot import mcu: no silent fallback to ours
        main(["--workload", "mlp", "--n", "2", "--t", "3", "--rounds", "1", "--compare", str(other)])
    capsys.readouterr()
    main(["--workload", "mlp", "--n", "2", "--t", "3", "--strategies", "loop,prefix,no-such", "--rounds", "2"])
    out = capsys.readouterr().out
    assert out.count("round 2: prefix") == 1 and "no-such FAILED" in out
    assert "loop " in out.split("rounds (added peak MB")[1] and "{'prefix x3': 2}" in out
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path / "missing")])


def test_transformer_workload_counts_encoder_matmuls_and_has_its_own_cases():
    from mcu.bench.cli import parser, settings_from
    from mcu.bench.workloads import WORKLOADS, TransformerSpec

    spec = TransformerSpec()
    h, i, length, layers = 256, 1024, 64, 4
    # per token and layer: Q, K, V, output (4 h^2), FFN up and down (2 h i), scores and context (2 L h) MACs
    per_token = 2 * layers * (4 * h * h + 2 * h * i + 2 * length * h) / 1e9
    assert spec.gflop_per_token == per_token and WORKLOADS["transformer"].gflop_per_row == per_token * length
    chosen = settings_from(parser().parse_args(["--workloads", "transformer", "--backend", "all"]))
    assert chosen.cases == [(8, 30)] and chosen.memory_cases == [(8, 30)] and chosen.precision_case == (8, 30)
    given = settings_from(parser().parse_args(["--workloads", "transformer", "--n", "2", "--t", "3"]))
    assert given.cases == [(2, 3)]
    full = settings_from(parser().parse_args(["--full"]))
    assert "transformer" not in [w.name for w in full.workloads] and len(full.workloads) == 4
    quick = settings_from(parser().parse_args([]))
    assert [w.name for w in quick.workloads] == ["mlp", "cnn"] and quick.cases == [(64, 100), (1, 100)]


def test_transformer_bench_rows_report_dense_gflops_against_the_matmul_peak(tmp_path, capsys):
    """BERT (PyTorch) and the Keras encoder at N=2, T=3: timing rows with the dense-layer GFLOP/s, the
    matmul peak rows of the same run, the spread of the samples, and the train() loop as a reference."""
    require_backend("torch")
    require_backend("tensorflow")
    require_module("transformers")
    from mcu.bench.cli import main

    out = tmp_path / "results"
    assert main([
        "--backend", "all", "--workloads", "transformer", "--n", "2", "--t", "3", "--repeats", "1",
        "--strategies", "loop,vectorized", "--precisions", "fp32,bf16", "--externals", "article-loop",
        "--no-memory", "--no-precision-impact", "--no-convergence", "--out", str(out),
        "--markdown", str(tmp_path / "RESULTS.md"), "--no-progress",
    ]) == 0
    results = json.loads((out / "results.json").read_text())
    peaks = {(r["backend"], r["precision"]) for r in results["peak"] if r["status"] == "ok" and r["gflops"] > 0}
    assert peaks == {(b, p) for b in ("torch", "tensorflow") for p in ("fp32", "bf16")}
    for backend in ("torch", "tensorflow"):
        rows = {(r["strategy"], r["precision"]): r for r in results["timing"] if r["backend"] == backend}
        assert {k for k, r in rows.items() if r["status"] == "ok"} == {
            ("loop", "fp32"), ("loop", "bf16"), ("vectorized", "fp32"), ("vectorized", "bf16"), ("article-loop", "fp32")}
        for r in rows.values():
            assert r["dense_gflop_per_row"] > 0.4 and r["sample_std"] > 0  # dropout is on in every row
    assert (out / "peak.csv").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Dense-layer throughput" in printed and "x train()" in printed
    assert "Dense-layer throughput" in (tmp_path / "RESULTS.md").read_text()


def test_transformer_copies_script_times_each_copies_value_against_the_train_loop(capsys):
    require_backend("torch")
    require_module("transformers")
    import pytest

    from benchmarks.transformer_copies import main

    main(["--n", "1", "--t", "2", "--copies", "1,2", "--rounds", "1", "--precision", "fp32"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split("  ")[0] for row in rows] == ["train() loop", "vectorized x1", "vectorized x2"]
    assert rows[0].rstrip().endswith("1.00x the fp32 train() loop")
    for bad in (["--copies", "0"], ["--copies", "two"], ["--precision", "fp16"]):
        with pytest.raises(SystemExit):
            main(bad)
