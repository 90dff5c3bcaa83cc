"""The benchmark models: each architecture is written once as a layer list, built by one builder per framework.

A layer list is a tuple of ``(op, *args)``: ``dense(units)``, ``conv(filters)`` (3x3, same padding),
``bn``, ``relu``, ``pool`` (2x2 max), ``flatten``, ``dropout(p)``, ``spatial_dropout(p)`` (whole feature maps:
``nn.Dropout2d`` / ``SpatialDropout2D``). Input shapes are written channels-last; the PyTorch builder and
:func:`inputs` move channels first. A user model comes from a ``"module:function"`` factory instead.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["WORKLOADS", "Workload", "custom_workload", "inputs"]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    input_shape: tuple[int, ...]  # per example, channels-last (a custom model: exactly as given)
    layers: tuple[tuple, ...] = ()
    task: str = "classification"  # outputs are logits (softmax taken for metrics) | "regression": raw values
    factory: str | None = None  # "module:function" of a user model (called with no arguments)

    @property
    def gflop_per_row(self) -> float | None:
        """Forward-pass GFLOP per example (2 x multiply-adds of dense and conv layers); None if unknown."""
        if self.factory:
            return None
        shape, macs = list(self.input_shape), 0
        for op, *args in self.layers:
            if op == "dense":
                macs += shape[-1] * args[0]
                shape = [args[0]]
            elif op == "conv":
                macs += shape[0] * shape[1] * 9 * shape[2] * args[0]
                shape = [shape[0], shape[1], args[0]]
            elif op == "pool":
                shape = [shape[0] // 2, shape[1] // 2, shape[2]]
            elif op == "flatten":
                shape = [math.prod(shape)]
        return 2 * macs / 1e9

    def build(self, backend: str, seed: int = 0) -> Any:
        """A fresh model with weights drawn from ``seed`` (the same seed gives the same weights)."""
        if self.factory:
            module, _, function = self.factory.partition(":")
            _seed(backend, seed)
            return getattr(importlib.import_module(module), function)()
        _seed(backend, seed)
        return _build_torch(self.layers, self.input_shape) if backend == "torch" else _build_keras(
            self.layers, self.input_shape
        )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "mlp", "the article's MCNet 784-512-10, Dropout 0.5", (784,),
            (("dense", 512), ("relu",), ("dropout", 0.5), ("dense", 10)),
        ),
        Workload(
            "cnn", "conv32-BN-pool-Dropout2d-conv64-BN-pool-Dropout2d-fc128-Dropout-fc10 on 28x28x1", (28, 28, 1),
            (
                ("conv", 32), ("bn",), ("relu",), ("pool",), ("spatial_dropout", 0.25),
                ("conv", 64), ("bn",), ("relu",), ("pool",), ("spatial_dropout", 0.25),
                ("flatten",), ("dense", 128), ("relu",), ("dropout", 0.5), ("dense", 10),
            ),
        ),
        Workload(
            "deep-mlp", "784-1024-1024-1024-10, Dropout 0.5 after every hidden layer", (784,),
            (("dense", 1024), ("relu",), ("dropout", 0.5)) * 3 + (("dense", 10),),
        ),
        Workload(
            "regression", "10-64-64-1, Dropout 0.2 after both hidden layers", (10,),
            (("dense", 64), ("relu",), ("dropout", 0.2)) * 2 + (("dense", 1),),
            task="regression",
        ),
    )
}


def custom_workload(factory: str, input_shape: tuple[int, ...], task: str = "classification") -> Workload:
    """A user model: ``factory`` is ``"module:function"``; ``input_shape`` is per example, in the model's layout."""
    if ":" not in factory:
        raise ValueError(f"--model: expected 'module:function', got {factory!r}")
    return Workload("custom", f"user model {factory}", tuple(input_shape), task=task, factory=factory)


def inputs(workload: Workload, backend: str, n: int, seed: int = 1) -> np.ndarray:
    """``n`` standard-normal float32 examples in the layout of ``backend`` (channels first for torch)."""
    x = np.random.default_rng(seed).standard_normal((n, *workload.input_shape), dtype=np.float32)
    if backend == "torch" and not workload.factory and len(workload.input_shape) == 3:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    return x


def _seed(backend: str, seed: int) -> None:
    if backend == "torch":
        import torch

        torch.manual_seed(seed)
    else:
        import keras

        keras.utils.set_random_seed(seed)


def _build_torch(layers: tuple[tuple, ...], input_shape: tuple[int, ...]) -> Any:
    from torch import nn

    shape = [input_shape[-1], *input_shape[:-1]] if len(input_shape) == 3 else list(input_shape)  # (C, H, W)
    modules: list[nn.Module] = []
    for op, *args in layers:
        if op == "dense":
            modules.append(nn.Linear(shape[-1], args[0]))
            shape = [args[0]]
        elif op == "conv":
            modules.append(nn.Conv2d(shape[0], args[0], 3, padding=1))
            shape = [args[0], *shape[1:]]
        elif op == "pool":
            modules.append(nn.MaxPool2d(2))
            shape = [shape[0], shape[1] // 2, shape[2] // 2]
        elif op == "flatten":
            modules.append(nn.Flatten())
            shape = [math.prod(shape)]
        elif op == "bn":
            modules.append(nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0]))
        elif op == "relu":
            modules.append(nn.ReLU())
        elif op == "dropout":
            modules.append(nn.Dropout(args[0]))
        elif op == "spatial_dropout":
            modules.append(nn.Dropout2d(args[0]))
        else:
            raise ValueError(f"unknown layer {op!r}")
    return nn.Sequential(*modules).eval()


def _build_keras(layers: tuple[tuple, ...], input_shape: tuple[int, ...]) -> Any:
    import keras

    L = keras.layers
    make = {
        "dense": lambda units: L.Dense(units),
        "conv": lambda filters: L.Conv2D(filters, 3, padding="same"),
        "bn": L.BatchNormalization,
        "relu": L.ReLU,
        "pool": lambda: L.MaxPooling2D(2),
        "flatten": L.Flatten,
        "dropout": lambda p: L.Dropout(p),
        "spatial_dropout": lambda p: L.SpatialDropout2D(p),
    }
    return keras.Sequential([keras.Input(input_shape)] + [make[op](*args) for op, *args in layers])
