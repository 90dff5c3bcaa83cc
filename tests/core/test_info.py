"""``mcu info`` names the framework Keras runs on, resolved as Keras does, without importing Keras."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from mcu.backends import keras_backend
from mcu.core.info import backend_info, format_info
from tests.conftest import require_module

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")


@pytest.fixture
def keras_not_imported(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "keras", raising=False)  # restored after the test
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return tmp_path


def test_keras_backend_follows_keras_resolution_order(keras_not_imported, monkeypatch):
    assert keras_backend() == ("tensorflow", "Keras' default")
    (keras_not_imported / "keras.json").write_text(json.dumps({"backend": "torch"}))
    assert keras_backend() == ("torch", str(keras_not_imported / "keras.json"))
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # the environment beats the file
    assert keras_backend() == ("jax", "KERAS_BACKEND")
    assert "keras" not in sys.modules
    assert "keras on    jax (KERAS_BACKEND)" in format_info(backend_info())


def test_an_unreadable_keras_json_falls_back_to_the_default(keras_not_imported):
    (keras_not_imported / "keras.json").write_text("{not json")
    assert keras_backend() == ("tensorflow", "Keras' default")


def test_an_imported_keras_answers_itself():
    keras = require_module("keras")
    assert keras_backend() == (keras.backend.backend(), "Keras is imported in this process")
