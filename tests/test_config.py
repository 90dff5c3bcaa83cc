"""Backend resolution order, aliases, file configuration and import isolation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mcu
from mcu import config
from mcu.backends import REGISTRY, get_backend


@pytest.fixture(autouse=True)
def clean_config(monkeypatch, tmp_path):
    monkeypatch.delenv("MCU_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)
    mcu.set_backend(None)
    yield
    mcu.set_backend(None)


def resolved():
    choice = config.configured_backend()
    return None if choice is None else choice.name


@pytest.mark.parametrize("alias,name", [("torch", "torch"), ("pytorch", "torch"), ("PyTorch", "torch"),
                                        ("tensorflow", "tensorflow"), ("tf", "tensorflow"), ("keras", "tensorflow")])
def test_aliases(alias, name):
    mcu.set_backend(alias)
    assert resolved() == name


def test_nothing_configured_means_detection():
    assert resolved() is None


def test_resolution_order(monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.mcu]\nbackend = "torch"\n')
    assert config.configured_backend().reason.startswith("[tool.mcu]")
    assert resolved() == "torch"
    (tmp_path / "mcu.toml").write_text('backend = "tf"\n')
    assert resolved() == "tensorflow"  # mcu.toml beats pyproject.toml
    monkeypatch.setenv("MCU_BACKEND", "pytorch")
    assert resolved() == "torch"  # environment beats files
    mcu.set_backend("keras")
    assert resolved() == "tensorflow"  # set_backend beats environment
    with mcu.use_backend("torch"):
        assert resolved() == "torch"  # use_backend beats set_backend
        with mcu.use_backend("tf"):
            assert resolved() == "tensorflow"
        assert resolved() == "torch"
        assert config.configured_backend("keras").name == "tensorflow"  # the argument beats everything
    assert resolved() == "tensorflow"


@pytest.mark.parametrize("setter", ["set_backend", "use_backend", "env", "file", "argument"])
def test_invalid_names_are_rejected_by_name(monkeypatch, tmp_path, setter):
    with pytest.raises(mcu.BackendError, match="unknown backend 'jaxx'"):
        if setter == "set_backend":
            mcu.set_backend("jaxx")
        elif setter == "use_backend":
            with mcu.use_backend("jaxx"):
                pass
        elif setter == "env":
            monkeypatch.setenv("MCU_BACKEND", "jaxx")
            resolved()
        elif setter == "file":
            (tmp_path / "pyproject.toml").write_text('[tool.mcu]\nbackend = "jaxx"\n')
            resolved()
        else:
            config.configured_backend("jaxx")


def test_broken_toml_names_the_file(tmp_path):
    (tmp_path / "mcu.toml").write_text("backend = \n")
    with pytest.raises(mcu.InputError, match="mcu.toml: not valid TOML"):
        resolved()


def test_missing_framework_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(REGISTRY, "fake", ("mcu_no_such_module:Backend", ("no-such-dist",), "fake"))
    with pytest.raises(mcu.BackendNotInstalledError, match=r'pip install "mcu\[fake\]"'):
        get_backend("fake")


def test_model_of_unknown_type():
    with pytest.raises(mcu.BackendError, match="model: cannot tell which framework"):
        mcu.sample(object(), [[1.0]], 2)


def test_import_mcu_imports_no_framework():
    code = "import sys, mcu, mcu.metrics; print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_backend_info_reports_reason(monkeypatch):
    monkeypatch.setenv("MCU_BACKEND", "tf")
    info = mcu.backend_info()
    assert info["selected"] == "tensorflow" and info["reason"] == "MCU_BACKEND=tf"
    assert set(info["frameworks"]) == {"torch", "tensorflow"}


def test_cli_info_runs():
    env = dict(os.environ, MCU_BACKEND="torch")
    out = subprocess.run([sys.executable, "-m", "mcu.cli", "info"], capture_output=True, text=True, check=True, env=env)
    assert "backend     torch" in out.stdout and "MCU_BACKEND=torch" in out.stdout
