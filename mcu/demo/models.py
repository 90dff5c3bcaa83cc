"""Small dropout networks for the demo and the examples, the same architecture in PyTorch and in Keras.

* Classifier (digits): ``in -> 128 -> ReLU -> Dropout(p) -> 128 -> ReLU -> Dropout(p) -> C`` logits.
* Regressor (diabetes): ``in -> 64 -> ReLU -> Dropout(0.2) -> 64 -> ReLU -> Dropout(0.2) -> 1``.

Training is seeded and takes seconds on a CPU. Both classifier trainers follow one schedule: the same
sequence of shuffled mini-batches (drawn with numpy from ``seed``), Adam, cross-entropy. The frameworks are
imported inside the functions that need them, so importing this module imports neither.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import numpy as np

__all__ = [
    "BACKENDS",
    "accuracy",
    "build_classifier",
    "default_backend",
    "logits",
    "single_thread",
    "train_classifier",
    "train_regressor",
]

BACKENDS = ("torch", "tensorflow")


def default_backend() -> str:
    """The configured backend (``mcu.config``), else the first of torch, tensorflow that can run here (the
    Keras backend also with Keras on JAX or PyTorch, without TensorFlow)."""
    from mcu.backends import missing
    from mcu.config import configured_backend

    choice = configured_backend()
    if choice is not None:
        return choice.name
    for name in BACKENDS:
        if missing(name) is None:
            return name
    raise ImportError('the demo needs PyTorch or TensorFlow (or Keras on JAX): pip install "mcu[torch]", '
                      '"mcu[tensorflow-cpu]" or "mcu[keras]" "jax[cpu]"')


@contextlib.contextmanager
def single_thread(backend: str) -> Iterator[None]:
    """Run PyTorch with one intra-op thread inside the block (restored after); a no-op for TensorFlow.

    These networks are tiny: one thread runs their small matrix products faster than two, and on a busy
    machine spinning OpenMP threads waiting for each other slow them down by an order of magnitude.
    """
    if backend != "torch":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(n: int, epochs: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """The mini-batches of ``epochs`` shuffled passes over ``n`` examples (shared by both frameworks)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out


def build_classifier(backend: str, n_features: int, n_classes: int, *, hidden: int = 128, dropout: float = 0.3,
                     seed: int = 0) -> Any:
    """An untrained ``n_features -> hidden -> hidden -> n_classes`` MLP with dropout after each hidden layer."""
    if backend == "torch":
        import torch

        with torch.random.fork_rng():  # seeded initialisation without moving the global stream
            torch.manual_seed(seed)
            return torch.nn.Sequential(
                torch.nn.Linear(n_features, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden, n_classes),
            )
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((n_features,)),
        keras.layers.Dense(hidden, activation="relu"), keras.layers.Dropout(dropout),
        keras.layers.Dense(hidden, activation="relu"), keras.layers.Dropout(dropout),
        keras.layers.Dense(n_classes),
    ])


def train_classifier(backend: str, x: np.ndarray, y: np.ndarray, n_classes: int, *, seed: int = 0,
                     epochs: int = 40, batch_size: int = 32, lr: float = 1e-3, min_steps: int = 0,
                     model: Any = None, **build: Any) -> Any:
    """Train a dropout classifier (logits out) on ``x`` ``(n, d)`` float32 and integer labels ``y`` ``(n,)``.

    Args:
        backend: ``"torch"`` or ``"tensorflow"``.
        epochs: passes over the data; raised so that at least ``min_steps`` optimizer steps run (small
            labeled sets in active learning need more passes).
        model: a model from :func:`build_classifier` to train; default: a new one (``**build`` options).

    Returns:
        The trained model (a ``torch.nn.Module`` in eval mode, or a ``keras.Sequential``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(x) / batch_size)))
    batches = _batches(len(x), epochs, batch_size, seed)
    if model is None:
        model = build_classifier(backend, x.shape[1], n_classes, seed=seed, **build)
    if backend == "torch":
        import torch

        with torch.random.fork_rng(), single_thread(backend):
            torch.manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            model.train()
            for idx in batches:
                index = torch.from_numpy(idx)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xt[index]), yt[index]).backward()
                opt.step()
        return model.eval()
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(lr, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    order = np.concatenate(batches)  # one long epoch of the same mini-batches: no per-epoch overhead
    model.fit(x[order], y[order], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model


def logits(model: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Deterministic outputs (dropout off) as numpy, ``(n, C)``."""
    from mcu.backends import detect

    if detect(model) == "tensorflow":
        return np.concatenate([np.asarray(model(x[i : i + batch_size], training=False))
                               for i in range(0, len(x), batch_size)])
    import torch

    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        finally:
            model.train(was_training)


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the deterministic (dropout off) predictions."""
    return float(np.mean(np.argmax(logits(model, x), axis=1) == np.asarray(y)))


def train_regressor(backend: str, x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 300) -> Any:
    """A ``d -> 64 -> 64 -> 1`` dropout regressor (MSE, Adam 1e-3, batch 32), seeded."""
    if backend == "torch":
        import torch

        with torch.random.fork_rng(), single_thread(backend):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(
                torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 1))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
            for _ in range(epochs):
                for idx in torch.randperm(len(xt)).split(32):
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(model(xt[idx]), yt[idx]).backward()
                    opt.step()
        return model.eval()
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dropout(0.2), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dropout(0.2), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit(x, y[:, None], epochs=epochs, batch_size=32, verbose=0)
    return model
