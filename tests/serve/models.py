"""Small dropout models for the serving tests; importable factories (``tests.serve.models:torch_classifier``)
so a ``mcu serve`` subprocess and Ray Serve replicas build the same weights."""

from __future__ import annotations

N_FEATURES, N_CLASSES = 4, 3


def torch_classifier():
    """4 features -> 3 logits, Dropout 0.5; the same weights on every call."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, N_CLASSES)).eval()


def torch_regressor():
    import torch

    torch.manual_seed(1)
    nn = torch.nn
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1)).eval()


def keras_classifier():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dropout(0.5), keras.layers.Dense(N_CLASSES)])


def classifier(backend: str):
    return torch_classifier() if backend == "torch" else keras_classifier()
