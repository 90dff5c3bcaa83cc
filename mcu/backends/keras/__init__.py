"""The Keras 3 backend, on whichever framework Keras runs (TensorFlow: graph fast paths; JAX, PyTorch: eager).

Modules: :mod:`.backend` (:class:`KerasBackend`, the protocol of :mod:`mcu.backends.base`), :mod:`.switches`
(which layers are dropout sites, and switching them on for mcu's own passes without touching the model),
:mod:`.graph` (the functional graph as a program), :mod:`.split` (prefix caching), :mod:`.masks` (exact
per-sample dropout masks), :mod:`.memory` (activation metering), :mod:`.precision` (bf16 copies),
:mod:`.portable` (full passes when Keras runs on JAX or PyTorch), :mod:`.jit` (``jax.jit``-compiled passes on JAX).
"""

from mcu.backends.keras.backend import KerasBackend, PortableKerasBackend, create

__all__ = ["KerasBackend", "PortableKerasBackend", "create"]
