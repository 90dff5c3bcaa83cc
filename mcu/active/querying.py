"""Pool queries (:func:`mcu.active.query`): score an unlabeled pool chunk by chunk and return the examples to label next."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from mcu._seeds import derive_seed
from mcu.active._pool import iter_chunks, pool_length
from mcu.active.acquisition import SCORES, bald, batch_bald, get_heuristic, uniform_scores
from mcu.core.engines import engine_function
from mcu.core.progress import progress_bar
from mcu._checks import check_int
from mcu.core.sampling import MAX_SEED, sample
from mcu.errors import InputError

__all__ = ["check_k", "derive_seed", "query", "score_chunk", "sorted_subset"]


def query(
    model: Any,
    pool: Any,
    k: int,
    *,
    heuristic: str = "bald",
    n_samples: int = 30,
    batch_size: int = 256,
    seed: int | None = None,
    progress: bool | None = None,
    backend: str | None = None,
    from_logits: bool = True,
    subset: Iterable[int] | None = None,
    n_candidates: int | None = None,
    strategy: str = "auto",
    engine: str = "local",
    output: Any = None,
    **engine_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` pool examples the model is most uncertain about, by an acquisition heuristic.

    The pool is read in chunks of ``batch_size`` examples; each chunk is sampled with
    :func:`mcu.sample` (``n_samples`` passes), scored, and merged into a running top list, so memory is
    bounded by one chunk of samples ``(n_samples, batch_size, C)`` plus the kept examples, whatever the
    pool size. Chunk ``i`` is sampled with the seed :func:`mcu._seeds.derive_seed` ``(seed, i)``: the same
    ``seed`` and ``batch_size`` give the same answer, and no two chunks share dropout masks.

    ``heuristic="random"`` does not run the model. ``heuristic="batchbald"`` needs the samples of the
    examples it chooses among, so it keeps only the ``n_candidates`` examples with the highest BALD
    scores (default ``min(pool, max(4k, 256))``) with their samples, then runs
    :func:`mcu.active.acquisition.batch_bald` on them; memory stays ``O(n_candidates · n_samples · C)``.

    Args:
        model: a PyTorch or Keras classifier with dropout (anything :func:`mcu.sample` accepts).
        pool: a numpy array, a map-style dataset (e.g. a torch ``Dataset``) of ``x`` or ``(x, y)`` items, a
            torch ``DataLoader`` in dataset order, or a ``tf.data.Dataset`` of examples.
        k: how many examples to return, ``1 <= k <=`` the number of examples considered.
        heuristic: a name in :data:`mcu.active.acquisition.HEURISTICS`.
        n_samples: MC-dropout passes per example.
        batch_size: examples per chunk (and per call of :func:`mcu.sample`).
        seed: makes the query reproducible (dropout masks, random scores, BatchBALD's configuration draws).
        progress: show a ``tqdm`` progress bar over chunks (when tqdm is installed); ``None``: as the
            ``MCU_PROGRESS`` environment variable says, else only when stderr is a terminal.
        backend: forwarded to :func:`mcu.sample`.
        from_logits: whether the model outputs logits (``True``) or probabilities (``False``).
        subset: pool indices to consider (e.g. the unlabeled ones); default: the whole pool.
        n_candidates: BatchBALD's candidate-set size, raised to ``k`` if smaller (ignored by the other
            heuristics).
        strategy: forwarded to :func:`mcu.sample` (pass it explicitly to reproduce a query exactly elsewhere).
        output: what to score when the model returns a structure (e.g. ``"logits"``; see :func:`mcu.sample`).
            The pool may then also be a dict of arrays sharing the batch axis (``input_ids``, ``attention_mask``).
        engine: ``"local"`` (this process) or ``"ray"`` (Ray Data actors, see :func:`mcu.distributed.query`;
            ``engine_options`` such as ``num_workers`` go there).

    Returns:
        ``(indices, scores)``: pool indices of the chosen examples, ``(k,)`` int64, and their scores,
        ``(k,)`` float64, sorted by descending score, ties broken by the lower index. For BatchBALD the
        order is the greedy choice order and the scores are the per-step gains (see ``batch_bald``).

    Example:
        >>> indices, scores = query(model, x_unlabeled, 10, heuristic="bald", seed=0)  # doctest: +SKIP
        >>> bool((np.diff(scores) <= 0).all())                                         # doctest: +SKIP
        True
    """
    remote = engine_function(engine, "query")
    if remote is not None:
        return remote(model, pool, k, heuristic=heuristic, n_samples=n_samples, batch_size=batch_size, seed=seed,
                         progress=progress, backend=backend, from_logits=from_logits, subset=subset,
                         n_candidates=n_candidates, strategy=strategy, output=output, **engine_options)
    if engine_options:
        raise InputError(f"engine_options: {sorted(engine_options)} only apply to engine='ray'.")
    get_heuristic(heuristic)
    check_int(k, "k", minimum=1)
    check_int(n_samples, "n_samples", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(seed, "seed", minimum=0, maximum=MAX_SEED, allow_none=True)
    check_int(n_candidates, "n_candidates", minimum=1, allow_none=True)
    subset_array = sorted_subset(subset)
    available = pool_length(pool) if subset_array is None else len(subset_array)
    check_k(k, available)
    pointwise = heuristic in SCORES
    keep = k if pointwise else max(k, n_candidates or max(4 * k, 256))
    best = _RunningTop(keep, keep_samples=not pointwise)
    n_chunks = None if available is None else -(-available // batch_size)
    with progress_bar(progress, total=n_chunks, desc="mcu.active.query", unit="chunk") as bar:
        for i, (indices, x) in enumerate(iter_chunks(pool, batch_size, subset_array)):
            try:
                scores, samples = score_chunk(model, x, heuristic=heuristic, n_samples=n_samples,
                                              seed=derive_seed(seed, i), from_logits=from_logits,
                                              strategy=strategy, n_examples=len(indices), backend=backend,
                                              output=output)
            except InputError as exc:
                if not str(exc).startswith("x:"):
                    raise
                # the pool's examples are this call's x: name the argument the caller passed
                raise InputError(f"pool: examples {int(indices[0])} to {int(indices[-1])}: {exc}") from exc
            best.push(indices, scores, samples)
            bar.update()
    check_k(k, best.seen)
    if pointwise:
        return best.indices, best.scores
    local, gains = batch_bald(best.samples, k, from_logits=from_logits, seed=seed)
    return best.indices[local], gains


class _RunningTop:
    """The ``size`` highest-scoring examples seen so far (and their samples), ties to the lower index."""

    def __init__(self, size: int, *, keep_samples: bool) -> None:
        self.size = size
        self.keep_samples = keep_samples
        self.indices = np.empty(0, dtype=np.int64)
        self.scores = np.empty(0)
        self.samples: np.ndarray | None = None
        self.seen = 0

    def push(self, indices: np.ndarray, scores: np.ndarray, samples: np.ndarray | None = None) -> None:
        self.seen += len(indices)
        indices = np.concatenate([self.indices, np.asarray(indices, dtype=np.int64)])
        scores = np.concatenate([self.scores, np.asarray(scores, dtype=np.float64)])
        order = np.lexsort((indices, -scores))[: self.size]  # last key first: score desc, then index asc
        self.indices, self.scores = indices[order], scores[order]
        if self.keep_samples:
            both = samples if self.samples is None else np.concatenate([self.samples, samples], axis=1)
            self.samples = both[:, order]


def score_chunk(
    model: Any,
    x: Any,
    *,
    heuristic: str,
    n_samples: int,
    seed: int | None = None,
    from_logits: bool = True,
    strategy: str = "auto",
    n_examples: int | None = None,
    **sample_options: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Acquisition scores of one chunk of the pool: the unit of work of :func:`query` on every engine.

    Args:
        model: the classifier (not used by ``heuristic="random"``).
        x: the chunk's inputs, batch axis first (may be ``None`` for ``"random"`` when ``n_examples`` is given).
        heuristic: a name in :data:`mcu.active.acquisition.HEURISTICS`; ``"batchbald"`` scores by BALD (the
            batch is chosen later, among the best candidates, from their samples).
        n_samples: MC-dropout passes per example.
        seed: the chunk's seed (:func:`derive_seed` of the query's seed and the chunk index).
        from_logits: whether the model outputs logits (``True``) or probabilities (``False``).
        strategy, **sample_options: forwarded to :func:`mcu.sample` (``backend``, ``chunk_size``, ...).
        n_examples: the number of examples (default: the length of ``x``); only ``"random"`` needs it.

    Returns:
        ``(scores, samples)``: ``(n,)`` scores (higher = query first) and the ``(n_samples, n, C)`` samples
        they came from (``None`` for ``"random"``, which draws none).
    """
    if heuristic == "random":  # no model needed
        return uniform_scores(len(x) if n_examples is None else n_examples, seed), None
    samples = sample(model, x, n_samples, seed=seed, strategy=strategy, **sample_options)
    score = SCORES[heuristic] if heuristic in SCORES else bald
    return score(samples, from_logits=from_logits), samples


def sorted_subset(subset: Iterable[int] | None) -> np.ndarray | None:
    """``subset`` as sorted unique int64 pool indices (``None`` stays ``None``); rejects duplicates."""
    if subset is None:
        return None
    array = np.asarray(list(subset) if not isinstance(subset, np.ndarray) else subset)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise InputError(
            f"subset: expected a 1-d sequence of integer pool indices, got dtype {array.dtype} shape {array.shape}."
        )
    unique = np.unique(array.astype(np.int64))
    if len(unique) != len(array):
        raise InputError(f"subset: expected distinct pool indices, got {len(array) - len(unique)} duplicate(s).")
    return unique


def check_k(k: int, available: int | None) -> None:
    """Raise :class:`~mcu.errors.InputError` when ``k`` exceeds the ``available`` examples (if known)."""
    if available is not None and k > available:
        raise InputError(f"k: expected at most the {available} examples in the pool (or subset), got {k}.")
