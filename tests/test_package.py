"""``import mcu`` and its lazy subpackage attributes import no framework, Ray or plotting library; the wheel
holds mcu alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mcu

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tensorflow", "keras", "jax", "ray", "matplotlib")


def _modules_after(code: str) -> list[str]:
    """Top-level module names loaded by ``code`` in a fresh interpreter (this checkout first on the path)."""
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_subpackages_are_attributes():
    for name in ("active", "metrics", "triage", "monitor", "distributed"):
        assert name in mcu._SUBPACKAGES
        assert name in dir(mcu)
    serve_exists = (ROOT / "mcu" / "serve").is_dir() or (ROOT / "mcu" / "serve.py").is_file()
    assert ("serve" in mcu._SUBPACKAGES) == serve_exists


def test_import_mcu_and_its_subpackages_imports_no_heavy_library():
    attributes = "; ".join(f"mcu.{name}" for name in mcu._SUBPACKAGES)
    loaded = _modules_after(f"import mcu; {attributes}; mcu.active.query; mcu.distributed.__all__")
    assert "mcu" in loaded
    assert [name for name in HEAVY if name in loaded] == []


def test_readme_spelling_works_after_a_bare_import():
    loaded = _modules_after(
        "import mcu, importlib\n"
        "assert mcu.active.query is importlib.import_module('mcu.active').query\n"
        "assert callable(mcu.active.query) and mcu.triage.fit_thresholds and mcu.monitor.DriftMonitor\n"
        "assert mcu.metrics.mutual_information"
    )
    assert "mcu" in loaded


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        mcu.no_such_thing  # noqa: B018


def test_bench_main_process_imports_no_framework():
    loaded = _modules_after("import mcu.bench.cli, mcu.bench.suite, mcu.bench.report, mcu.bench.serve")
    assert [name for name in HEAVY if name in loaded] == []


def test_the_wheel_holds_mcu_and_no_top_level_benchmarks_package():
    setuptools = pytest.importorskip("setuptools")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(where=str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "mcu.bench" in packages
    assert [p for p in packages if p.split(".")[0] != "mcu"] == []
