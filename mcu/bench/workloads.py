"""The benchmark models: each architecture is written once as a layer list, built by one builder per framework.

A layer list is a tuple of ``(op, *args)``: ``dense(units)``, ``conv(filters)`` (3x3, same padding),
``bn``, ``relu``, ``pool`` (2x2 max), ``flatten``, ``dropout(p)``, ``spatial_dropout(p)`` (whole feature maps:
``nn.Dropout2d`` / ``SpatialDropout2D``). Input shapes are written channels-last; the PyTorch builder and
:func:`inputs` move channels first. A user model comes from a ``"module:function"`` factory instead.

A transformer workload is described by a :class:`TransformerSpec` instead of a layer list: on PyTorch it is
Hugging Face ``BertForSequenceClassification`` (random weights, sdpa attention) behind a wrapper that takes the
token ids alone (attention mask all ones) and returns the logits; on Keras a post-norm encoder of the same
size built from Keras layers. Its inputs are integer token ids ``(N, seq_len)``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["WORKLOADS", "TransformerSpec", "Workload", "custom_workload", "inputs"]


@dataclass(frozen=True)
class TransformerSpec:
    """A BERT-style encoder classifier: token + position embeddings, ``layers`` post-norm blocks (multi-head
    self-attention, GELU feed-forward), the first token's pooled state, a linear head. Dropout ``dropout`` on
    the embeddings, the attention probabilities, after the attention output and the feed-forward, and before
    the head (Hugging Face BERT's sites)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024
    seq_len: int = 64
    vocab: int = 30522  # BertConfig's default
    dropout: float = 0.1  # BertConfig's hidden and attention dropout defaults
    classes: int = 2

    @property
    def gflop_per_token(self) -> float:
        """Encoder matmul GFLOP per token (2 x multiply-adds): Q, K, V and output projections (4 h^2), the
        feed-forward (2 h i), attention scores and context (2 L h), times the layers. Embeddings, layer norms,
        softmax, the pooler and the head are left out (under 1% here)."""
        h, i, length = self.hidden, self.intermediate, self.seq_len
        return 2 * self.layers * (4 * h * h + 2 * h * i + 2 * length * h) / 1e9


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    input_shape: tuple[int, ...]  # per example, channels-last (a custom model: exactly as given)
    layers: tuple[tuple, ...] = ()
    task: str = "classification"  # outputs are logits (softmax taken for metrics) | "regression": raw values
    factory: str | None = None  # "module:function" of a user model (called with no arguments)
    transformer: TransformerSpec | None = None  # a transformer classifier instead of a layer list
    cases: tuple[tuple[int, int], ...] = ()  # its own (N, T) cases when --n/--t are not given (else the profile's)

    @property
    def gflop_per_row(self) -> float | None:
        """Forward-pass GFLOP per example (2 x multiply-adds of dense and conv layers; a transformer's encoder
        matmuls); None if unknown."""
        if self.factory:
            return None
        if self.transformer:
            return self.transformer.gflop_per_token * self.transformer.seq_len
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
        if self.transformer:
            return _build_bert(self.transformer) if backend == "torch" else _build_keras_transformer(self.transformer)
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
        Workload(
            "transformer", "BERT-style encoder, hidden 256, 4 layers x 4 heads, FFN 1024, 64 tokens, Dropout 0.1 "
            "(PyTorch: Hugging Face BertForSequenceClassification, sdpa; Keras: the same blocks from Keras layers)",
            (64,), transformer=TransformerSpec(), cases=((8, 30),),
        ),
    )
}


def custom_workload(factory: str, input_shape: tuple[int, ...], task: str = "classification") -> Workload:
    """A user model: ``factory`` is ``"module:function"``; ``input_shape`` is per example, in the model's layout."""
    if ":" not in factory:
        raise ValueError(f"--model: expected 'module:function', got {factory!r}")
    return Workload("custom", f"user model {factory}", tuple(input_shape), task=task, factory=factory)


def inputs(workload: Workload, backend: str, n: int, seed: int = 1) -> np.ndarray:
    """``n`` standard-normal float32 examples in the layout of ``backend`` (channels first for torch); for a
    transformer, uniform token ids ``(n, seq_len)`` (int64 for torch, int32 for Keras)."""
    if workload.transformer:
        spec = workload.transformer
        dtype = np.int64 if backend == "torch" else np.int32
        return np.random.default_rng(seed).integers(0, spec.vocab, (n, spec.seq_len)).astype(dtype)
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


def _build_bert(spec: TransformerSpec) -> Any:
    """Hugging Face ``BertForSequenceClassification`` with random weights, in eval mode, wrapped to take the
    token ids alone and return the logits: the suite feeds every workload one array, and the ``train()`` loop
    it is compared with calls the model the same way (users pass ``{"input_ids": ..., "attention_mask": ...}``
    with ``output="logits"``; the tests cover that)."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
                        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout,
                        num_labels=spec.classes, attn_implementation="sdpa")

    class BertLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertForSequenceClassification(config)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits

    return BertLogits().eval()


def _build_keras_transformer(spec: TransformerSpec) -> Any:
    """A functional Keras model with BERT's blocks and dropout sites (post-norm, GELU, pooled first token)."""
    import keras

    L = keras.layers

    class PositionEmbedding(L.Layer):
        """Adds a learned embedding of each position to its token's embedding."""

        def build(self, input_shape: Any) -> None:
            self.positions = self.add_weight(shape=tuple(input_shape[1:]), initializer="random_normal",
                                              name="positions")

        def call(self, x: Any) -> Any:
            return x + self.positions

    ids = keras.Input((spec.seq_len,), dtype="int32")
    x = PositionEmbedding()(L.Embedding(spec.vocab, spec.hidden)(ids))
    x = L.Dropout(spec.dropout)(L.LayerNormalization(epsilon=1e-12)(x))
    for _ in range(spec.layers):
        attention = L.MultiHeadAttention(spec.heads, spec.hidden // spec.heads, dropout=spec.dropout)(x, x)
        x = L.LayerNormalization(epsilon=1e-12)(x + L.Dropout(spec.dropout)(attention))
        ffn = L.Dense(spec.hidden)(L.Dense(spec.intermediate, activation="gelu")(x))
        x = L.LayerNormalization(epsilon=1e-12)(x + L.Dropout(spec.dropout)(ffn))
    pooled = L.Dense(spec.hidden, activation="tanh")(x[:, 0])
    return keras.Model(ids, L.Dense(spec.classes)(L.Dropout(spec.dropout)(pooled)))
