"""Iterate an unlabeled pool in chunks of numpy arrays, whatever container holds it.

A pool is one of:

* a numpy array ``(N, *input_shape)``;
* a map-style dataset: anything with ``__len__`` and ``__getitem__`` (a ``torch.utils.data.Dataset``, a list),
  whose items are ``x`` or ``(x, y, ...)``;
* a ``torch.utils.data.DataLoader`` that keeps the dataset order (no shuffling, no ``drop_last``), whose
  batches are ``x`` or ``(x, y, ...)``;
* a ``tf.data.Dataset`` of examples (``x`` or ``(x, y, ...)``; call ``.unbatch()`` on a batched one).

Positions in that order are the pool indices used everywhere in :mod:`mcu.active`. No framework is imported:
torch and TensorFlow containers are recognised through ``sys.modules`` (if the framework was never imported,
the pool cannot be one of its objects), and their tensors are converted by duck typing.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator

import numpy as np

from mcu.errors import InputError
from mcu.structured import is_structured, rows, take_rows

__all__ = ["iter_chunks", "pool_length", "take"]

Chunk = tuple[np.ndarray, np.ndarray]  # (pool indices (n,), inputs (n, *input_shape))


def pool_length(pool: Any) -> int | None:
    """Number of examples in ``pool``, or ``None`` when the container cannot tell without a full pass."""
    kind = _kind(pool)
    if kind == "dataloader":
        return len(pool.dataset) if hasattr(pool.dataset, "__len__") else None
    if kind == "tf":
        cardinality = int(pool.cardinality())
        if cardinality == -1:  # tf.data.INFINITE_CARDINALITY
            raise InputError("pool: got an infinite tf.data.Dataset; expected a finite one (drop .repeat()).")
        return None if cardinality < 0 else cardinality
    return rows(pool, "pool") if kind == "structured" else len(pool)


def iter_chunks(pool: Any, batch_size: int, subset: np.ndarray | None = None) -> Iterator[Chunk]:
    """Yield ``(indices, x)`` chunks of at most ``batch_size`` examples, in pool order.

    Args:
        pool: see the module docstring.
        batch_size: maximum rows per chunk; memory is bounded by one chunk (plus one container batch).
        subset: sorted unique pool indices to visit (default: all).

    Example:
        >>> [idx.tolist() for idx, _ in iter_chunks(np.zeros((5, 2)), 2, subset=np.array([0, 3, 4]))]
        [[0, 3], [4]]
    """
    kind = _kind(pool)
    if kind in ("array", "map", "structured"):
        n = rows(pool, "pool") if kind == "structured" else len(pool)
        indices = np.arange(n) if subset is None else subset
        _check_subset(indices, n)
        if kind == "map":
            gather = lambda idx: _stack(pool[int(i)] for i in idx)  # noqa: E731
        else:
            gather = lambda idx: take_rows(pool, idx)  # noqa: E731
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            yield idx, gather(idx)
        return
    batches = _dataloader_batches(pool) if kind == "dataloader" else _tf_batches(pool, batch_size)
    yield from _rechunk(_filter(batches, subset), batch_size)


def take(pool: Any, indices: Iterable[int], batch_size: int = 256) -> np.ndarray:
    """The inputs of ``pool`` at ``indices`` (any order, no duplicates), stacked in that order.

    Example:
        >>> take(np.arange(10).reshape(5, 2), [3, 1]).tolist()
        [[6, 7], [2, 3]]
    """
    wanted = np.asarray(list(indices), dtype=np.int64)
    order = np.argsort(wanted, kind="stable")
    parts = [x for _, x in iter_chunks(pool, batch_size, subset=wanted[order])]
    found = np.concatenate(parts) if parts else np.empty((0,))
    if len(found) != len(wanted):
        raise InputError(f"indices: expected {len(wanted)} distinct pool indices, found {len(found)} in the pool.")
    out = np.empty_like(found)
    out[order] = found
    return out


def _kind(pool: Any) -> str:
    if is_structured(pool):  # a dict (or tuple) of arrays sharing the batch axis, e.g. token ids + mask
        rows(pool, "pool")
        return "structured"
    if isinstance(pool, np.ndarray):
        if pool.ndim == 0:
            raise InputError("pool: expected an array with a batch axis first, got a 0-d array.")
        return "array"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(pool, torch.utils.data.DataLoader):
        _check_ordered_loader(pool, torch.utils.data)
        return "dataloader"
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(pool, tf.data.Dataset):
        return "tf"
    if hasattr(pool, "__len__") and hasattr(pool, "__getitem__") and not isinstance(pool, (str, bytes)):
        return "map"
    raise InputError(
        f"pool: expected a numpy array, a map-style dataset (with __len__ and __getitem__, e.g. a torch "
        f"Dataset), a torch DataLoader or a tf.data.Dataset, got {type(pool).__qualname__}."
    )


def _check_ordered_loader(loader: Any, data: Any) -> None:
    """Pool indices are positions in the loader's order, so that order must be the dataset's own."""
    batch_sampler = loader.batch_sampler
    sampler = batch_sampler.sampler if isinstance(batch_sampler, data.BatchSampler) else loader.sampler
    ordered = isinstance(sampler, data.SequentialSampler) or isinstance(loader.dataset, data.IterableDataset)
    if batch_sampler is not None and type(batch_sampler) is not data.BatchSampler:
        ordered = False
    if not ordered:
        raise InputError(
            f"pool: got a DataLoader with sampler {type(sampler).__qualname__}; expected the dataset order "
            "(shuffle=False, no custom sampler) so that returned indices are positions in the dataset."
        )
    if getattr(loader, "drop_last", False):
        raise InputError("pool: got a DataLoader with drop_last=True; expected drop_last=False (no example skipped).")


def _inputs(item: Any) -> np.ndarray:
    """The ``x`` of an item or batch ``x`` / ``(x, y, ...)`` as a host numpy array."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise InputError("pool: got an empty tuple as an example; expected x or (x, y).")
        item = item[0]
    if isinstance(item, dict):
        raise InputError("pool: got a dict example; expected x or (x, y). Map the dataset to (x, y) first.")
    if hasattr(item, "detach"):  # torch.Tensor, possibly on an accelerator
        item = item.detach().cpu()
    if hasattr(item, "numpy") and not isinstance(item, np.ndarray):
        item = item.numpy()
    return np.asarray(item)


def _stack(items: Iterable[Any]) -> np.ndarray:
    return np.stack([_inputs(item) for item in items])


def _check_subset(indices: np.ndarray, n: int) -> None:
    if len(indices) and (indices[0] < 0 or indices[-1] >= n):
        raise InputError(f"subset: expected pool indices in [0, {n}), got values from {indices[0]} to {indices[-1]}.")


def _dataloader_batches(loader: Any) -> Iterator[np.ndarray]:
    for batch in loader:
        x = _inputs(batch)
        yield x[None] if loader.batch_size is None else x  # batch_size=None: the loader yields single examples


def _tf_batches(dataset: Any, batch_size: int) -> Iterator[np.ndarray]:
    for batch in dataset.batch(batch_size).as_numpy_iterator():
        yield _inputs(batch)


def _filter(batches: Iterator[np.ndarray], subset: np.ndarray | None) -> Iterator[Chunk]:
    """Attach pool positions to a stream of batches, keeping only the rows in ``subset``."""
    start = 0
    for x in batches:
        idx = np.arange(start, start + len(x))
        start += len(x)
        if subset is not None:
            keep = np.isin(idx, subset, assume_unique=True)
            idx, x = idx[keep], x[keep]
        if len(idx):
            yield idx, x
    if subset is not None:
        _check_subset(subset, start)


def _rechunk(chunks: Iterator[Chunk], batch_size: int) -> Iterator[Chunk]:
    """Regroup a stream of chunks of any sizes into chunks of exactly ``batch_size`` (the last may be smaller)."""
    held: list[Chunk] = []
    count = 0
    for chunk in chunks:
        held.append(chunk)
        count += len(chunk[0])
        while count >= batch_size:
            idx, x = np.concatenate([c[0] for c in held]), np.concatenate([c[1] for c in held])
            yield idx[:batch_size], x[:batch_size]
            held, count = [(idx[batch_size:], x[batch_size:])], count - batch_size
    if count:
        yield np.concatenate([c[0] for c in held]), np.concatenate([c[1] for c in held])
