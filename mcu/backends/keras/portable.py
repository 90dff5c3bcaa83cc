"""Keras 3 on JAX or PyTorch (``KERAS_BACKEND=jax|torch``): full passes, the same switches.

The backend's own fast paths (traced functions, the prefix split, per-sample masks, the mixed-precision copy)
are TensorFlow code; on another Keras backend the ``loop`` and ``vectorized`` strategies run full passes of the
model inside :func:`.switches.active` (sites on, seeds from the pass key, no variable written): compiled with
``jax.jit`` on JAX (:mod:`.jit`), eager on PyTorch. The split reports why it is not available, so
``auto`` says so in ``SampleInfo``.
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
    passes = "compiled with jax.jit" if NAME == "jax" else "eager, not compiled"
    return (f"prefix caching and per-sample masks need Keras on TensorFlow (this Keras runs on {NAME!r}: "
            f"KERAS_BACKEND); full passes run instead ({passes})")


@contextlib.contextmanager
def no_gradients() -> Iterator[None]:
    if NAME == "torch":
        import torch

        with torch.no_grad():
            yield
    else:  # JAX records nothing outside a transformation
        yield


def to_tensor(x: Any, argument: str = "x", compute_dtype: str | None = None) -> Any:
    """``x`` (a numpy array or a tensor of this Keras backend) as a tensor, checked finite, also after Keras
    casts floating inputs to the model's ``compute_dtype`` (values beyond its range would become inf)."""
    if isinstance(x, np.ndarray):
        array = x
    elif keras.ops.is_tensor(x) or isinstance(x, keras.Variable):
        array = _numpy(x)
    else:
        raise InputError(f"{argument}: expected a numpy array or a {NAME} tensor (or, for x, a dict or tuple of "
                         f"them), got {type(x).__qualname__}.")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{argument}: contains NaN or infinite values; expected finite inputs.")
    if array.dtype.kind == "f" and compute_dtype is not None:
        compute = np.dtype(keras.backend.standardize_dtype(compute_dtype).replace("bfloat16", "float32"))
        if compute.kind == "f" and compute.itemsize < array.dtype.itemsize:
            with np.errstate(over="ignore"):
                if not np.isfinite(array.astype(compute)).all():
                    raise InputError(f"{argument}: contains values beyond the range of the model's compute dtype "
                                     f"{compute.name} (given {array.dtype.name}); expected finite inputs after "
                                     "that conversion.")
    return keras.ops.convert_to_tensor(array)


def _install_seeded_dropout() -> None:
    """Keras on PyTorch drops out with torch's process-wide generator when a layer was built without a seed (the
    default), so those masks would ignore the pass key and depend on other threads' draws. Inside an MC pass
    (:func:`.switches.active`) every dropout takes Keras' seeded path instead: its mask comes from the layer's
    seed generator, which the pass maps to a seed from its key. Outside a pass the original runs unchanged."""
    from keras.src.backend.torch import random as torch_random

    original = torch_random.dropout
    if getattr(original, "_mcu_seeded", False):
        return

    def dropout(inputs: Any, rate: Any, noise_shape: Any = None, seed: Any = None) -> Any:
        if noise_shape is None and isinstance(seed, keras.random.SeedGenerator) and _switches.in_pass():
            noise_shape = tuple(inputs.shape)  # an explicit noise shape selects Keras' seeded path
        return original(inputs, rate, noise_shape=noise_shape, seed=seed)

    dropout._mcu_seeded = True  # type: ignore[attr-defined]
    torch_random.dropout = dropout


if NAME == "torch":
    _install_seeded_dropout()


def forward(model: Any, x: Any, session: _switches.Session, key: np.ndarray, reached: set[int] | None) -> Any:
    if NAME == "jax":  # eager JAX passes dispatch op by op: compiled instead
        from mcu.backends.keras import jit

        return jit.forward(model, x, session, key, reached)
    training = session.mode == "training"
    with no_gradients(), _switches.active(session.sites, key, force=not training, reached=reached):
        return model(x, training=training)


def repeat(x: Any, n: int) -> Any:
    return keras.ops.tile(x, [n] + [1] * (len(x.shape) - 1))


def _numpy(t: Any) -> np.ndarray:
    if NAME == "torch" and hasattr(t, "detach"):  # Keras' conversion goes through a deprecated np.array(tensor)
        t = t.detach().cpu()
        return (t.float() if t.dtype.is_floating_point and t.element_size() < 4 else t).numpy()
    return keras.ops.convert_to_numpy(t)


def to_numpy(t: Any) -> np.ndarray:
    out = _numpy(t)
    return out.astype(np.float32) if out.dtype.kind == "f" and out.dtype.itemsize < 4 else out


def nbytes(t: Any) -> int:
    return int(np.prod(t.shape)) * np.dtype(keras.backend.standardize_dtype(t.dtype)).itemsize
