"""Exact Bernoulli dropout masks for the PyTorch fast paths, from counter-based per-sample random streams.

Each Monte Carlo sample has its own stream (:class:`Streams`), so a sample's masks depend only on its seed, never
on how samples are grouped into passes or spread over threads. The streams are *counter-based*: word ``i`` of
the stream with key ``K`` is ``splitmix64(K + (i + 1) * GAMMA)`` (Steele, Lea & Flood 2014, the finaliser of
Java's ``SplittableRandom``; it passes BigCrush). Every word of every stream of a block is computed by a dozen
whole-tensor integer operations, on any device; no generator objects are seeded or called per sample.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from typing import Iterator, Sequence

import numpy as np
import torch

from mcu import _seeds

__all__ = ["Streams", "bernoulli_masks", "splitmix64"]

_MASK64 = (1 << 64) - 1
_GAMMA = _seeds.GAMMA
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_WORD = 1 << 32
_EXPANSION = 104  # bits of keep's binary expansion: 8 + 3 x 32
#: Counter offset of the words that key the tie-resolution streams (one per mask): far beyond any count of bulk
#: words, so the two never meet.
_TIES = 1 << 62
#: A block's masks are sliced from masks drawn once for all samples of the call when those take at most this
#: many bytes (:meth:`Streams.masks`).
SHARED_MASK_BYTES = 1 << 20


def _signed(v: int) -> int:
    """A 64-bit word as the int64 value with the same bits."""
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def splitmix64(z: int) -> int:
    """The SplitMix64 finaliser of a 64-bit word (reference for the tensor version; unsigned result)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX[0]) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX[1]) & _MASK64
    return z ^ (z >> 31)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """:func:`splitmix64` in place on an int64 tensor (wrapping products; ``>>`` on int64 is arithmetic, so the
    shifted-in sign bits are masked off to make it a logical shift)."""
    tmp = torch.empty_like(z)
    for shift, multiplier in zip((30, 27), _MIX):
        torch.bitwise_right_shift(z, shift, out=tmp)
        z ^= tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.mul_(_signed(multiplier))
    torch.bitwise_right_shift(z, 31, out=tmp)
    z ^= tmp.bitwise_and_((1 << 33) - 1)
    return z


@functools.lru_cache(maxsize=64)
def _steps(count: int, device: torch.device) -> torch.Tensor:
    """``(1, count)`` int64: ``(i + 1) * GAMMA`` for ``i < count`` (wrapping)."""
    return torch.arange(1, count + 1, dtype=torch.int64, device=device).mul_(_signed(_GAMMA)).view(1, count)


class Streams:
    """One counter-based random stream per sample: ``words(count)`` gives every stream its next ``count``
    64-bit words at once. Stream ``j``'s key is :func:`mcu._seeds.sample_keys` of ``seeds[j]`` (as for
    Keras); the seeds are distinct per sample (:class:`mcu.strategies.base.SeedStream`), so the keys are too.

    All streams consume the same number of bulk words (one mask after another, in graph order), so one counter
    serves them all. ``streams[a:b]`` is a view of streams ``a`` to ``b`` (one block of a call's samples): its
    :meth:`masks` may be sliced from masks drawn once for all streams of the call (the same values, since each
    stream's words depend only on its key and counter), which saves the per-block drawing cost."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        keys = torch.from_numpy(_seeds.sample_keys(self.seeds).view(np.int64)).view(-1, 1)
        self.keys = keys.to(self.device)
        self.offset = 0
        self._parent: Streams | None = None  # a view's root (the root itself is not stored: no reference cycle)
        self.start = 0
        self._shared: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._lock = threading.Lock()  # blocks of one call may run in parallel threads

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: slice) -> "Streams":
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("Streams: only contiguous slices streams[a:b]")
        start, stop, _ = index.indices(len(self))
        view = object.__new__(Streams)
        view.device, view.seeds, view.keys = self.device, self.seeds[start:stop], self.keys[start:stop]
        view.offset, view._parent, view.start = self.offset, self.root, self.start + start
        return view

    @property
    def root(self) -> "Streams":
        """The streams of the whole call this one is a view of (itself if it is not a view)."""
        return self if self._parent is None else self._parent

    def words(self, count: int) -> torch.Tensor:
        """``(k, count)`` int64 tensor of uniform 64-bit words (all bits random), stream ``j`` in row ``j``."""
        z = self.keys + _signed(self.offset * _GAMMA)
        z = z + _steps(count, self.device)
        self.offset += count
        return _mix_(z)

    def tie_words(self, j: int, offset: int) -> Iterator[int]:
        """32-bit words for resolving the ties of stream ``j``'s mask that starts at bulk word ``offset``: a
        SplitMix64 stream keyed by word ``2**62 + offset`` of stream ``j`` (never a bulk word), so they depend
        only on the stream and the mask, not on which streams were drawn together."""
        key = splitmix64(int(_seeds.sample_keys(self.seeds[j : j + 1])[0]) + (_TIES + offset + 1) * _GAMMA)
        for i in itertools.count(1):
            yield splitmix64(key + i * _GAMMA) & (_WORD - 1)

    def masks(self, key: object, shape: tuple[int, ...], keep: float, device: torch.device) -> torch.Tensor:
        """:func:`bernoulli_masks` for these streams at their current position (``key`` names the dropout).
        A view's masks are drawn once for all streams of its root and sliced, when they take at most
        SHARED_MASK_BYTES."""
        root = self.root
        if root is self or len(root) * math.prod(shape) > SHARED_MASK_BYTES:
            return bernoulli_masks(shape, keep, self, device)
        name = (key, self.offset, tuple(shape), keep)
        with root._lock:
            entry = root._shared.get(name)
            if entry is None:
                root.offset = self.offset
                drawn = bernoulli_masks(shape, keep, root, device)
                entry = root._shared[name] = (drawn, root.offset - self.offset)
        self.offset += entry[1]
        return entry[0][self.start:self.start + len(self)]


@functools.lru_cache(maxsize=64)
def _shifts(b: int, device: torch.device) -> torch.Tensor:
    """``(1, 8 // b, 1)`` uint8 shifts 0, b, 2b, ...: plane ``s`` of a byte holds its bits [s*b, (s+1)*b)."""
    return (torch.arange(8 // b, dtype=torch.uint8) * b).view(1, -1, 1).to(device)


@functools.lru_cache(maxsize=256)
def keep_bits(keep: float) -> tuple[int, int]:
    """``(b, q)`` with ``keep == q / 2**b`` for the smallest ``b`` in 1, 2, 4, 8 (dyadic keep rates: 0.5, 0.75,
    0.9375, any multiple of 1/256); otherwise ``(0, q)`` with ``q`` the first 104 bits of ``keep``'s expansion
    (:func:`mcu._seeds.keep_plan`)."""
    bits, threshold, rest = _seeds.keep_plan(keep, _EXPANSION, (1, 2, 4, 8))
    return (bits, threshold) if rest == 0 else (0, (threshold << (_EXPANSION - bits)) | rest)


def _bytes(words: torch.Tensor) -> torch.Tensor:
    """``(k, w)`` int64 words -> ``(k, 8 w)`` uniform random bytes."""
    k, w = words.shape
    return words.view(torch.uint8).view(k, 8 * w)


def bernoulli_masks(shape: tuple[int, ...], keep: float, streams: Streams, device: torch.device) -> torch.Tensor:
    """``(k, *shape)`` uint8 masks of independent Bernoulli(``keep``) draws, mask ``j`` from stream ``j``.

    Exact for ``keep`` as a float64. Dyadic rates ``keep = q / 2**b`` (b = 1, 2, 4 or 8) compare ``b``-bit
    fields of random bytes with ``q``: one random bit per element for ``keep = 0.5``. Other rates compare a
    random byte with the first 8 bits of ``keep``'s binary expansion; the ~1/256 of elements that tie draw
    32-bit words compared with the next bits (words reserved per mask in the same draw; rare overflows and
    second ties draw words from the sample's own tie stream). The expansion has 104 bits, which represents
    every float64 ``keep >= 2**-52`` exactly; below that the error is under 2**-104.
    """
    k, n = len(streams), math.prod(shape)
    if not 0.0 < keep < 1.0:
        return torch.full((k,) + tuple(shape), int(keep >= 1.0), dtype=torch.uint8, device=device)
    b, q = keep_bits(keep)
    if b:
        per_byte = 8 // b
        n_bytes = -(-n // per_byte)
        raw = _bytes(streams.words(-(-n_bytes // 8)))[:, :n_bytes]
        if b == 8:
            mask = torch.lt(raw, q, out=torch.empty((k, n_bytes), dtype=torch.uint8, device=device))
        else:  # b-bit fields: plane s holds bits [s*b, (s+1)*b) of every byte (any fixed layout is exact)
            planes = torch.empty((k, per_byte, n_bytes), dtype=torch.uint8, device=device)
            torch.bitwise_right_shift(raw.unsqueeze(1), _shifts(b, device), out=planes)
            planes &= (1 << b) - 1
            if b == 1:
                mask = planes  # keep = 1/2: the bit itself (P(bit = 1) = 1/2)
            else:
                mask = torch.lt(planes, q, out=planes)
        mask = mask.view(k, -1)
        return (mask if mask.shape[1] == n else mask[:, :n].contiguous()).view((k,) + tuple(shape))
    first, rest = q >> 96, [(q >> shift) & (_WORD - 1) for shift in (64, 32, 0)]
    draws, offset = -(-n // 8), streams.offset
    words = streams.words(draws + _reserve(n))
    raw = _bytes(words[:, :draws])[:, :n]
    mask = torch.lt(raw, first, out=torch.empty((k, n), dtype=torch.uint8, device=device))
    tie = torch.eq(raw, first, out=torch.empty((k, n), dtype=torch.uint8, device=device))
    flat = _nonzero(tie.view(-1))
    if flat.numel():
        _resolve_ties(mask.view(-1), flat, n, words[:, draws:] & (_WORD - 1), rest, streams, offset, device)
    return mask.view((k,) + tuple(shape))


def _reserve(n: int) -> int:
    """32-bit words reserved per mask of ``n`` elements for resolving ties (expected ``n / 256``; running out
    is rare and only costs extra draws)."""
    expected = n / 256
    return int(expected + 6 * math.sqrt(expected) + 8)


def _nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the nonzero bytes of a flat uint8 tensor; whole 8-byte words are screened first
    (ties are rare, and scanning words is ~8x cheaper than scanning bytes)."""
    m = flags.numel()
    if m % 8 or m < 4096:
        return flags.nonzero().squeeze(1)
    hit = flags.view(torch.int64).nonzero().squeeze(1)
    if hit.numel() == 0:
        return hit
    sub = flags.view(-1, 8)[hit].nonzero()
    return hit[sub[:, 0]] * 8 + sub[:, 1]


def _resolve_ties(mask: torch.Tensor, flat: torch.Tensor, n: int, reserve: torch.Tensor, rest: list[int],
                  streams: Streams, offset: int, device: torch.device) -> None:
    """Elements whose byte equalled keep's first byte: compare 32-bit words with the next 32-bit parts of the
    expansion (reserved words in order, per mask; a second tie or an exhausted reserve draws words from the
    mask's own tie stream, :meth:`Streams.tie_words`, in element order, so the result depends only on the
    sample's stream)."""
    if reserve.shape[0] == 1:  # one stream: the ties' ranks are their positions in `flat`
        positions, outside = flat[:reserve.shape[1]], flat[reserve.shape[1]:]
        words = reserve[0, :positions.numel()]
    else:
        sample = flat // n
        counts = torch.bincount(sample, minlength=reserve.shape[0])
        rank = torch.arange(flat.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[sample]
        inside = rank < reserve.shape[1]
        words = reserve[sample[inside], rank[inside]]
        positions, outside = flat[inside], flat[~inside]
    mask[positions] = words.lt(rest[0]).to(torch.uint8)  # tied elements are 0 so far
    second = words.eq(rest[0])
    later = [(int(p), 1) for p in positions[second].tolist()] if bool(second.any()) else []
    later += [(int(p), 0) for p in outside.tolist()]
    ties: dict[int, Iterator[int]] = {}
    for position, stage in sorted(later):
        j = position // n
        if j not in ties:
            ties[j] = streams.tie_words(j, offset)
        for threshold in rest[stage:]:
            word = next(ties[j])
            if word != threshold:
                mask[position] = int(word < threshold)
                break
        # a tie on every part: the draw equals keep's expansion, so U >= keep: dropped (mask stays 0)
