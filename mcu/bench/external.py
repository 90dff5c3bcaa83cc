"""External reference rows: other people's MC-dropout code, timed on the same models and inputs.

- ``article-loop``: the reference article's plain loops, verbatim in spirit. PyTorch ``get_uncertainty``:
  ``model.train(); torch.stack([model(x) for _ in range(T)])`` under ``no_grad``; Keras ``mc_predict``:
  ``np.stack([model(x, training=True) for _ in range(T)])`` (eager). Whole-model training mode: BatchNorm
  then uses batch statistics, so on the CNN these rows compute something slightly different from mcu.
- ``baal-replicate`` / ``baal-loop`` (PyTorch, when baal is installed): ``baal.bayesian.dropout.MCDropoutModule``
  (dropout layers swapped for always-on ones) and baal's ``mc_inference`` with ``replicate_in_memory`` True
  (all T copies in one pass) or False (a loop). baal returns the samples axis last, ``(N, C, T)``.

Each external gets its own freshly built copy of the model (same weights), so nothing it does to the model
(training mode, BatchNorm statistics, swapped modules) leaks into the mcu rows.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["EXTERNALS", "available", "make"]

#: name -> backends it exists for
EXTERNALS: dict[str, tuple[str, ...]] = {
    "article-loop": ("torch", "tensorflow"),
    "baal-replicate": ("torch",),
    "baal-loop": ("torch",),
}


def available(name: str, backend: str) -> bool:
    if backend not in EXTERNALS.get(name, ()):
        return False
    return not name.startswith("baal") or importlib.util.find_spec("baal") is not None


def make(name: str, backend: str, model: Any) -> Callable[[Any, int], np.ndarray]:
    """``run(x, T) -> samples`` for external ``name`` on a private ``model`` (x is a framework tensor)."""
    if name == "article-loop" and backend == "torch":
        import torch

        def article_torch(x: Any, t: int) -> np.ndarray:
            model.train()  # the article's key step
            with torch.no_grad():
                return torch.stack([model(x) for _ in range(t)]).numpy()

        return article_torch
    if name == "article-loop":

        def article_keras(x: Any, t: int) -> np.ndarray:
            return np.stack([model(x, training=True) for _ in range(t)], axis=0)

        return article_keras
    if name in ("baal-replicate", "baal-loop"):
        import torch
        from baal.bayesian.dropout import MCDropoutModule
        from baal.modelwrapper import mc_inference

        wrapped = MCDropoutModule(model).eval()
        replicate = name == "baal-replicate"

        def baal(x: Any, t: int) -> np.ndarray:
            with torch.no_grad():
                return mc_inference(wrapped, x, t, replicate).numpy()

        return baal
    raise ValueError(f"unknown external {name!r} for backend {backend!r}")
