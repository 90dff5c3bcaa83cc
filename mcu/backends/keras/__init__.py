"""The Keras 3 backend, on whichever framework Keras runs (TensorFlow: graph fast paths; JAX, PyTorch: full
passes, without TensorFlow).

Modules: :mod:`.base` (:class:`BaseKerasBackend`: what every framework shares, the protocol of
:mod:`mcu.backends.base` without the passes), :mod:`.switches` (which layers are dropout sites, and switching
them on for mcu's own passes without touching the model), :mod:`.memory` (weights and activation metering).
On TensorFlow: :mod:`.backend` (:class:`KerasBackend`), :mod:`.keys` (per-pass keys as tensors), :mod:`.graph`
(the functional graph as a program), :mod:`.split` (prefix caching), :mod:`.masks` (exact per-sample dropout
masks), :mod:`.precision` (bf16 copies). On JAX or PyTorch: :mod:`.portable` (:class:`PortableKerasBackend`,
full passes) and :mod:`.jit` (``jax.jit``-compiled passes on JAX); none of them imports TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BaseKerasBackend", "KerasBackend", "PortableKerasBackend", "create"]

#: class name -> the module defining it (imported on first use: only the TensorFlow path imports TensorFlow)
_CLASSES = {"BaseKerasBackend": "base", "KerasBackend": "backend", "PortableKerasBackend": "portable"}


def create() -> Any:
    """The Keras backend for the framework this process's Keras runs on (the registry's entry point):
    :class:`KerasBackend` on TensorFlow, :class:`PortableKerasBackend` on JAX or PyTorch."""
    import keras

    name = "KerasBackend" if keras.backend.backend() == "tensorflow" else "PortableKerasBackend"
    return __getattr__(name)()


def __getattr__(name: str) -> Any:
    if name not in _CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLASSES))
