"""``tests.conftest.require_module``: a missing framework skips locally and fails when CI requires it."""

from __future__ import annotations

import pytest

from tests import conftest
from tests.conftest import require_module


@pytest.fixture
def missing_backend_module(monkeypatch):
    """A module name that cannot be imported and belongs to backend 'torch'."""
    monkeypatch.setitem(conftest._BACKEND_OF, "mcu_no_such_module", "torch")
    return "mcu_no_such_module"


def test_present_module_is_returned():
    assert require_module("numpy").__name__ == "numpy"


def test_missing_module_skips_when_not_required(monkeypatch, missing_backend_module):
    monkeypatch.setenv("MCU_REQUIRE_BACKENDS", "tensorflow")
    with pytest.raises(pytest.skip.Exception):
        require_module(missing_backend_module)


def test_missing_module_fails_when_its_backend_is_required(monkeypatch, missing_backend_module):
    monkeypatch.setenv("MCU_REQUIRE_BACKENDS", "torch,tensorflow")
    with pytest.raises(pytest.fail.Exception, match="MCU_REQUIRE_BACKENDS"):
        require_module(missing_backend_module)


def test_missing_ray_module_fails_when_ray_is_required(monkeypatch):
    monkeypatch.setattr(conftest, "_RAY_MODULES", ("mcu_no_such_ray",))
    monkeypatch.setenv("MCU_REQUIRE_RAY", "1")
    with pytest.raises(pytest.fail.Exception, match="MCU_REQUIRE_RAY"):
        require_module("mcu_no_such_ray")
    monkeypatch.setenv("MCU_REQUIRE_RAY", "0")
    with pytest.raises(pytest.skip.Exception):
        require_module("mcu_no_such_ray")
