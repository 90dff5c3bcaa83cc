"""mcu: Monte Carlo dropout uncertainty for PyTorch and TensorFlow/Keras.

Public API: :func:`sample`, :func:`predict`, :func:`backend_info`, :func:`set_backend`, :func:`use_backend`,
and the errors. The subpackages ``mcu.active``, ``mcu.metrics``, ``mcu.triage``, ``mcu.monitor`` and
``mcu.distributed`` (and ``mcu.serve`` where installed) are attributes too, imported on first access.
Importing mcu imports no deep-learning framework, Ray or plotting library.
"""

import importlib
import os
from typing import Any

from mcu.config import set_backend, use_backend
from mcu.core.info import backend_info
from mcu.core.predict import Prediction, predict
from mcu.core.sampling import SampleInfo, sample
from mcu.errors import (
    BackendError,
    BackendMismatchError,
    BackendNotInstalledError,
    InputError,
    MCUError,
    NoDropoutError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendMismatchError",
    "BackendNotInstalledError",
    "InputError",
    "MCUError",
    "NoDropoutError",
    "Prediction",
    "SampleInfo",
    "__version__",
    "backend_info",
    "predict",
    "sample",
    "set_backend",
    "use_backend",
]

#: Subpackages reachable as ``mcu.<name>`` without importing them first; each is imported on first access.
#: A name whose module is absent from this installation is left out.
_SUBPACKAGES = tuple(
    name
    for name in ("active", "distributed", "metrics", "monitor", "serve", "triage")
    if any(os.path.isdir(os.path.join(path, name)) or os.path.isfile(os.path.join(path, f"{name}.py"))
           for path in __path__)
)


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"mcu.{name}")  # the import also sets the attribute on mcu
    raise AttributeError(f"module 'mcu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
