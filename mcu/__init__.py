"""mcu: Monte Carlo dropout uncertainty for PyTorch and TensorFlow/Keras.

Public API: :func:`sample`, :func:`backend_info`, :func:`set_backend`, :func:`use_backend`, and the errors.
Importing mcu imports no deep-learning framework.
"""

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
