"""Keras 3 on JAX or PyTorch (``KERAS_BACKEND=jax|torch``): full eager passes, the same switches.

The backend's own fast paths (traced functions, the prefix split, per-sample masks, the mixed-precision copy)
are TensorFlow code; on another Keras backend the ``loop`` and ``vectorized`` strategies run the model eagerly
inside :func:`._switches.active` (sites on, seeds from the pass key, no variable written), and the split reports
why it is not available, so ``auto`` says so in ``SampleInfo``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import keras
import numpy as np

from mcu.backends.keras import switches as _switches
from mcu.errors import InputError

__all__ = ["NAME", "PORTABLE", "no_gradients", "nbytes", "repeat", "to_numpy", "to_tensor", "unsplittable"]

NAME = keras.backend.backend()
#: Keras runs on another framework than TensorFlow: the eager path of this module is used.
PORTABLE = NAME != "tensorflow"


def unsplittable() -> str:
    return (f"prefix caching and per-sample masks need Keras on TensorFlow (this Keras runs on {NAME!r}: "
            "KERAS_BACKEND); full passes run instead")


@contextlib.contextmanager
def no_gradients() -> Iterator[None]:
    if NAME == "torch":
        import torch

        with torch.no_grad():
            yield
    else:  # JAX records nothing outside a transformation
        yield


def to_tensor(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        array = x
    elif keras.ops.is_tensor(x) or isinstance(x, keras.Variable):
        array = keras.ops.convert_to_numpy(x)
    else:
        raise InputError(f"x: expected a numpy array or a {NAME} tensor, got {type(x).__qualname__}.")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError("x: contains NaN or infinite values; expected finite inputs.")
    return keras.ops.convert_to_tensor(array)


@contextlib.contextmanager
def _global_rng(key: np.ndarray) -> Iterator[None]:
    """Keras on PyTorch draws unseeded layers' dropout (``seed=None``, the default) from torch's global
    generator: seeded from the pass key for the pass, its state restored afterwards. The generator is
    process-wide, so passes running at once on several threads may interleave their draws (then a seeded
    call is not reproducible; the distribution is unaffected)."""
    if NAME != "torch":
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.asarray(key).reshape(-1)[0]) & 0x7FFFFFFFFFFFFFFF)
        yield


def forward(model: Any, x: Any, session: _switches.Session, key: np.ndarray, reached: set[int] | None) -> Any:
    training = session.mode == "training"
    with no_gradients(), _global_rng(key), _switches.active(session.sites, key, force=not training,
                                                            reached=reached):
        return model(x, training=training)


def repeat(x: Any, n: int) -> Any:
    return keras.ops.tile(x, [n] + [1] * (len(x.shape) - 1))


def to_numpy(t: Any) -> np.ndarray:
    out = keras.ops.convert_to_numpy(t)
    return out.astype(np.float32) if out.dtype.kind == "f" and out.dtype.itemsize < 4 else out


def nbytes(t: Any) -> int:
    return int(np.prod(t.shape)) * np.dtype(keras.backend.standardize_dtype(t.dtype)).itemsize
