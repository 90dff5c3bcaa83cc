"""Activation metering for Keras: a rough per-pass memory estimate for the auto strategy's budget."""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from mcu.backends.keras import switches as _switches

__all__ = ["activation_bytes"]



def activation_bytes(run: Callable[[], Any]) -> int:
    """Bytes of the leaf-layer outputs (and fast-dropout / repeated tensors) of ``run()``, from static shapes.

    ``run`` is traced into a throwaway graph and never executed: no activation memory is allocated (an eager
    pass would peak at about its activations) and no random state moves. Metering is local to this context
    (:func:`._switches.metering`): the backend's functions run their Python meanwhile, other threads' calls
    are neither counted nor changed.
    """
    with _switches.metering() as meter:
        tf.function(lambda: (run(), None)[1], autograph=False).get_concrete_function()
    return meter[0]
