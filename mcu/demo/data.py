"""Bundled data for the demo and the examples: scikit-learn's digits (8x8) and diabetes, no download.

* :func:`digits_splits` — digits scaled to ``[0, 1]``, some classes held out as unseen (out-of-distribution)
  inputs, the seen classes split into train / validation / test and relabelled ``0..C-1``.
* :func:`digits_pool` — all ten classes split into an unlabeled pool and a test set (active learning).
* :func:`corrupt` — corruptions for drift tests (Gaussian noise, occlusion, inversion, blur).
* :func:`upsample_28` — 8x8 digits as 28x28 images flattened to 784 values (the article's MCNet input).
* :func:`diabetes_splits` — the diabetes regression data, standardised, train / calibration / test.

Needs scikit-learn (``pip install "mcu[all]"``); nothing here imports a deep-learning framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "CORRUPTIONS",
    "DEFAULT_HELD_OUT",
    "DigitsPool",
    "DigitsSplits",
    "corrupt",
    "diabetes_splits",
    "digits_pool",
    "digits_splits",
    "initial_indices",
    "upsample_28",
]

#: Digit classes kept out of training by default: the model never sees a 5 or a 9 (see ``digits_splits``).
DEFAULT_HELD_OUT = (5, 9)


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('the demo data needs scikit-learn: pip install "mcu[all]" (or scikit-learn)') from exc
    return datasets


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = _sklearn_datasets().load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@dataclass(frozen=True)
class DigitsSplits:
    """Digits with held-out classes. Inputs ``(n, 64)`` float32 in ``[0, 1]``; labels ``0..C-1`` int64.

    Attributes:
        x_train, y_train, x_val, y_val, x_test, y_test: the seen classes, relabelled ``0..C-1``.
        x_ood, y_ood: every example of the held-out classes (``y_ood`` holds the original digits).
        classes: the original digit of each label, ``classes[label]``.
        held_out: the digits kept out of training.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_ood: np.ndarray
    y_ood: np.ndarray
    classes: tuple[int, ...]
    held_out: tuple[int, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _split(n: int, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    cuts = np.cumsum([round(f * n) for f in fractions[:-1]])
    return np.split(order, cuts)


def digits_splits(seed: int = 0, held_out: Sequence[int] = DEFAULT_HELD_OUT,
                  fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> DigitsSplits:
    """Split the seen digits into train / validation / test (stratified) and keep ``held_out`` aside.

    Args:
        seed: seeds the shuffling.
        held_out: digits never used for training; their examples form ``x_ood``.
        fractions: train, validation and test shares of each seen class.

    Example:
        >>> d = digits_splits(0)                                   # doctest: +SKIP
        >>> d.n_classes, d.x_train.shape[1], sorted(set(d.y_ood))  # doctest: +SKIP
        (8, 64, [5, 9])
    """
    x, y = _load_digits()
    rng = np.random.default_rng(seed)
    held = tuple(sorted(int(c) for c in held_out))
    classes = tuple(int(c) for c in range(10) if c not in held)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in classes:  # stratified: every class in the same proportions in every split
        for part, idx in zip(parts, _split(int((y == c).sum()), fractions, rng)):
            part.append(np.flatnonzero(y == c)[idx])
    relabel = np.full(10, -1)
    relabel[list(classes)] = np.arange(len(classes))
    train, val, test = (rng.permutation(np.concatenate(p)) for p in parts)
    ood = np.flatnonzero(np.isin(y, held))
    return DigitsSplits(x[train], relabel[y[train]], x[val], relabel[y[val]], x[test], relabel[y[test]],
                        x[ood], y[ood], classes, held)


@dataclass(frozen=True)
class DigitsPool:
    """All ten digits: an unlabeled pool (with its hidden labels, the oracle's answers) and a test set."""

    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_pool(seed: int = 0, test_fraction: float = 0.3) -> DigitsPool:
    """Shuffle the ten digit classes into a pool and a test set (for active learning)."""
    x, y = _load_digits()
    pool, test = _split(len(y), (1 - test_fraction, test_fraction), np.random.default_rng(seed))
    return DigitsPool(x[pool], y[pool], x[test], y[test])


def initial_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` random indices of every class in ``labels`` (a balanced starting set)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


# -- corruptions ----------------------------------------------------------------------------------------------


def _images(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(-1, 8, 8)


def _noise(x: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, 0.6 * severity, x.shape).astype(np.float32)


def _occlude(x: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    img = _images(x).copy()
    size = max(1, round(5 * severity))
    for i, (r, c) in enumerate(rng.integers(0, 9 - size, size=(len(img), 2))):
        img[i, r : r + size, c : c + size] = 0.0
    return img.reshape(len(img), 64)


def _invert(x: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    return (1.0 - severity) * x + severity * (1.0 - x)


def _blur(x: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    img = _images(x)
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    box = sum(padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)) / 9.0
    return ((1 - severity) * img + severity * box).reshape(len(img), 64)


#: name -> function(x, severity, rng); severity in [0, 1]
CORRUPTIONS = {"noise": _noise, "occlusion": _occlude, "invert": _invert, "blur": _blur}


def corrupt(x: np.ndarray, kind: str = "noise", severity: float = 1.0, seed: int = 0) -> np.ndarray:
    """A corrupted copy of digits ``x`` ``(n, 64)``, clipped to ``[0, 1]``.

    Args:
        kind: one of :data:`CORRUPTIONS`: ``"noise"`` (Gaussian, sd ``0.6 * severity``), ``"occlusion"`` (a
            blank square of side ``5 * severity`` pixels), ``"invert"`` (``x -> 1 - x`` blended by severity),
            ``"blur"`` (3x3 box blur blended by severity).
        severity: in ``[0, 1]``.
        seed: seeds the random corruptions.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind: expected one of {sorted(CORRUPTIONS)}, got {kind!r}.")
    out = CORRUPTIONS[kind](np.asarray(x, dtype=np.float32), float(severity), np.random.default_rng(seed))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def upsample_28(x: np.ndarray) -> np.ndarray:
    """8x8 digits ``(n, 64)`` as 28x28 images ``(n, 784)``: each pixel repeated 3x3 (24x24), zero border of 2."""
    img = np.kron(_images(x), np.ones((3, 3), dtype=np.float32))
    return np.pad(img, ((0, 0), (2, 2), (2, 2))).reshape(len(img), 784)


# -- diabetes -------------------------------------------------------------------------------------------------


def diabetes_splits(seed: int = 0):
    """Diabetes split 60/20/20 into train, calibration and test; inputs and target standardised on train.

    Returns:
        ``((x_train, y_train), (x_cal, y_cal), (x_test, y_test))``, float32, ``x`` ``(n, 10)``, ``y`` ``(n,)``.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = _sklearn_datasets().load_diabetes(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed)
    x_cal, x_test, y_cal, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed)
    scaler = StandardScaler().fit(x_train)
    y_mu, y_sd = y_train.mean(), y_train.std()

    def f(a):
        return scaler.transform(a).astype(np.float32)

    def g(b):
        return ((b - y_mu) / y_sd).astype(np.float32)

    return (f(x_train), g(y_train)), (f(x_cal), g(y_cal)), (f(x_test), g(y_test))
