"""The Keras 3 backend on JAX or PyTorch (``KERAS_BACKEND=jax|torch``): full passes, the same switches, no
TensorFlow.

:class:`PortableKerasBackend` shares the sites, sessions and seeds of :class:`.base.BaseKerasBackend`. The
TensorFlow path's fast paths (traced functions, the prefix split, per-sample masks, the mixed-precision copy) are
TensorFlow code; here the ``loop`` and ``vectorized`` strategies run full passes of the model inside
:func:`.switches.active` (sites on, seeds from the pass key with numpy, no variable written): compiled with
``jax.jit`` on JAX (:mod:`.jit`), eager on PyTorch. The split reports why it is not available, so
``auto`` says so in ``SampleInfo``. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import keras
import numpy as np

from mcu import _seeds
from mcu.backends.keras import memory as _memory
from mcu.backends.keras import switches as _switches
from mcu.backends.keras.base import STRUCTURED_SPLIT, BaseKerasBackend
from mcu.errors import InputError, MCUError
from mcu.structured import Batch, is_structured, select_output

__all__ = ["NAME", "PortableKerasBackend", "no_gradients", "repeat", "to_numpy", "to_tensor", "unsplittable"]

#: The framework Keras runs on here (``jax`` or ``torch``)
NAME = keras.backend.backend()


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
    seeds = _switches.seed_values(key, len(session.sites.generators))
    with no_gradients(), _switches.active(session.sites, seeds, force=not training, reached=reached):
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




class PortableKerasBackend(BaseKerasBackend):
    """The Keras backend when Keras runs on JAX or PyTorch: the same sites, switches and seeds as on TensorFlow,
    full passes (``jax.jit``-compiled on JAX, eager on PyTorch); the TensorFlow fast paths (prefix split,
    per-sample masks, metering, mixed-precision copies) are not available, and each says why."""

    def model_for_precision(self, model: keras.layers.Layer, precision: str) -> keras.layers.Layer:
        if precision != "fp32":
            raise InputError(f"precision: {precision!r} on the tensorflow backend needs Keras on TensorFlow "
                             f"(this Keras runs on {NAME!r}); expected precision='fp32'.")
        return model

    def to_tensor(self, model: keras.layers.Layer, x: Any) -> Any:
        compute = getattr(model, "compute_dtype", None)
        if is_structured(x):
            return Batch.convert(x, lambda leaf, name: to_tensor(leaf, name, compute))
        return to_tensor(x, "x", compute)

    def _run(self, model: keras.layers.Layer, session: _switches.Session, x: Any) -> Any:
        """One pass (:func:`forward`: compiled on JAX, eager on PyTorch); the sites reached are checked once per
        model and dropout configuration."""
        with self._lock:
            entry = self._compiled.setdefault(model, {"lock": threading.Lock(), "functions": {}})
        checked = entry["functions"].get(("portable", session.sites.signature))
        reached: set[int] | None = None if checked else set()
        try:
            out = forward(model, x, session, session.stream.take(1), reached)
        except MCUError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: the input's fault or the model's, original as cause
            raise self._model_error(model, x, exc) from exc
        if reached is not None:
            _switches.check_reached(session.sites.layers, reached, "a forward pass")
            entry["functions"][("portable", session.sites.signature)] = True
        return out

    def select_output(self, out: Any, output: Any) -> Any:
        return select_output(out, output, keras.ops.is_tensor)  # JAX / torch arrays

    def split(self, model: keras.layers.Layer, x: Any) -> tuple[Any, str]:
        return None, STRUCTURED_SPLIT if isinstance(x, Batch) else unsplittable()

    def generators(self, model: keras.layers.Layer, seeds: list[int]) -> np.ndarray:
        """One key per sample seed, ``(k, 1)`` uint64 (:func:`mcu._seeds.sample_keys`); no split uses them here."""
        return _seeds.sample_keys(seeds).reshape(-1, 1)

    def activation_bytes(self, run: Callable[[], Any]) -> int | None:
        return None  # no static trace to meter outside TensorFlow

    def nbytes(self, t: Any) -> int:
        return _memory.nbytes(t)

    def repeat(self, x: Any, n: int) -> Any:
        if isinstance(x, Batch):
            return x.map(lambda t: repeat(t, n))
        return repeat(x, n)

    def to_numpy(self, t: Any) -> np.ndarray:
        return to_numpy(t)
