"""Shared fixtures. ``backend`` runs a test once per framework.

Locally a missing framework skips its half; set ``MCU_REQUIRE_BACKENDS=torch,tensorflow`` (CI does) to turn
such a skip into a failure, so a broken install can never pass as green.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BACKENDS = ("torch", "tensorflow")
_MODULE = {"torch": "torch", "tensorflow": "tensorflow"}


def require_backend(name: str) -> None:
    """Skip (locally) or fail (when required) if ``name``'s framework is not importable."""
    if importlib.util.find_spec(_MODULE[name]) is None:
        required = [b.strip() for b in os.environ.get("MCU_REQUIRE_BACKENDS", "").split(",") if b.strip()]
        if name in required:
            pytest.fail(f"backend {name!r} is required (MCU_REQUIRE_BACKENDS) but its framework is not installed")
        pytest.skip(f"{name} is not installed")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require_backend(request.param)
    return request.param


@pytest.fixture
def models(backend: str):
    """The model zoo of the current backend (see tests/_models.py)."""
    from tests import _models

    return _models.zoo(backend)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
