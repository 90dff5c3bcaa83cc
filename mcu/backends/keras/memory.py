"""Memory estimates for Keras, for the auto strategy's budget: the weights (any Keras backend) and activation
metering (a rough per-pass estimate, TensorFlow path)."""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np

from mcu import _host
from mcu.backends.keras import switches as _switches

__all__ = ["activation_bytes", "free_bytes", "nbytes", "weight_bytes"]

#: Sizes numpy cannot name without ml_dtypes
_ITEMSIZE = {"bfloat16": 2}


def activation_bytes(run: Callable[[], Any]) -> int:
    """Bytes of the leaf-layer outputs (and fast-dropout / repeated tensors) of ``run()``, from static shapes.

    ``run`` is traced into a throwaway graph and never executed: no activation memory is allocated (an eager
    pass would peak at about its activations) and no random state moves. Metering is local to this context
    (:func:`._switches.metering`): the backend's functions run their Python meanwhile, other threads' calls
    are neither counted nor changed. TensorFlow path only (imported here: the module serves every backend).
    """
    import tensorflow as tf

    def measure(t: Any) -> int:  # tensors of static shape count; anything else does not
        return t.shape.num_elements() * t.dtype.size if tf.is_tensor(t) and t.shape.is_fully_defined() else 0

    with _switches.metering(measure) as meter:
        tf.function(lambda: (run(), None)[1], autograph=False).get_concrete_function()
    return meter[0]


def nbytes(t: Any) -> int:
    """Bytes of a tensor or variable of any Keras backend, from its shape and dtype."""
    dtype = keras.backend.standardize_dtype(t.dtype)
    return int(np.prod(t.shape)) * (_ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize)


def weight_bytes(model: Any) -> int:
    """Bytes of ``model``'s variables (trainable or not; a variable shared between layers counts once), on any
    Keras backend."""
    return sum({id(v): nbytes(v) for v in model.weights}.values())


def free_bytes() -> int | None:
    """Host memory available when Keras computes on the CPU alone; None (unknown) when it sees an accelerator."""
    try:
        devices = keras.distribution.list_devices()
    except AttributeError:  # Keras on PyTorch has no distribution API
        import torch

        devices = ["gpu"] if torch.cuda.is_available() else ["cpu:0"]
    if any(not d.lower().startswith("cpu") for d in devices):
        return None
    return _host.available_memory()
