"""The backend protocol: the only framework surface that strategies and the core may touch.

A new framework is one new module implementing :class:`Backend` plus one line in
:data:`mcu.backends.REGISTRY`.
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol, Sequence

import numpy as np

__all__ = ["Backend", "MODES", "PRECISIONS"]

#: ``"dropout"``: only dropout layers stochastic (the default); ``"training"``: the whole model in training
#: mode, the literal recipe (BatchNorm then uses batch statistics).
MODES = ("dropout", "training")
PRECISIONS = ("fp32", "bf16", "fp16")


class Backend(Protocol):
    name: str

    def is_model(self, obj: Any) -> bool:
        """Whether ``obj`` is a model of this framework (no import: looks at ``sys.modules``)."""

    def dropout_layers(self, model: Any) -> Sequence[Any]:
        """Every dropout-family layer of ``model``; raises :class:`~mcu.errors.NoDropoutError` if none."""

    def mc_mode(self, model: Any, mode: str = "dropout") -> ContextManager[None]:
        """Inference mode everywhere but dropout (or whole-model training mode), no gradients; exact restore."""

    def seeded(self, model: Any, seed: int | None) -> ContextManager[None]:
        """Make the stochastic layers reproducible from ``seed`` inside the block; leave no trace outside it."""

    def model_for_precision(self, model: Any, precision: str) -> Any:
        """The model to run in ``precision``: itself (autocast) or a framework-specific low-precision copy."""

    def precision(self, model: Any, precision: str) -> ContextManager[None]:
        """Run forward passes in ``precision`` (autocast); fp32 is a no-op."""

    def to_tensor(self, model: Any, x: Any) -> Any:
        """Validate ``x`` (finite) and convert it to a framework tensor on the model's device."""

    def forward(self, model: Any, x: Any) -> Any:
        """One stochastic forward pass (inside :meth:`mc_mode`); raw output tensor."""

    def repeat(self, x: Any, n: int) -> Any:
        """``n`` copies of ``x`` stacked along the batch axis: ``[x; x; ...]``, shape ``(n * N, ...)``."""

    def to_numpy(self, t: Any) -> np.ndarray:
        """A host numpy copy of ``t`` (low-precision floats widened to float32)."""
