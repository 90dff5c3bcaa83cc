"""Fast exact dropout masks for Keras: one Philox stream per sample, a few random bits per element.

:func:`fast_dropout` runs a ``Dropout`` or ``SpatialDropout1D/2D/3D`` layer (exact classes, plain calls, static
per-example shapes) for ``k`` samples at once: sample ``j``'s masks come from its own Philox key (one stateless
draw per sample per block), using only a few random bits per element (:func:`keep_plan`: 1 bit at rate 0.5, 2
at 0.25, 16 plus exact tie resolution for other rates). Exact Bernoulli(1 - rate) draws, Keras' ``noise_shape``
and ``data_format`` broadcasting, Keras' output values.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from mcu import _seeds
from mcu.backends.keras import switches as _switches

_record = _switches.record

__all__ = ["FAST_TYPES", "bits_from_words", "fast_dropout", "fast_problem", "keep_bits", "keep_mask", "keep_plan",
           "sample_keys", "words_needed"]

#: Layer classes whose training-mode call :func:`fast_dropout` reproduces. Exact classes only: a subclass may
#: override ``call``. GaussianDropout and AlphaDropout keep running natively (Keras seed generators).
FAST_TYPES: tuple[type, ...] = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
)
_SPATIAL_RANK = {keras.layers.SpatialDropout1D: 3, keras.layers.SpatialDropout2D: 4, keras.layers.SpatialDropout3D: 5}
_PHILOX = 1  # tf.random.Algorithm.PHILOX
REGIONS = 4  # Philox counter blocks per dropout call (block 0: the words of all fast dropouts of a sample;
#               4 * i + 2: tie overflow of suffix step i)
_TIE_BITS = 16


def sample_keys(seeds: Sequence[int]) -> tf.Tensor:
    """One Philox key per sample seed, shape ``(k, 1)`` uint64 (:func:`mcu._seeds.sample_keys`)."""
    return tf.constant(_seeds.sample_keys(seeds).reshape(-1, 1))


def philox_words(keys: Sequence[tf.Tensor], n: int, region: int) -> tf.Tensor:
    """``(k, n)`` uniform uint32 words; row ``j`` is the start of Philox stream ``(keys[j], counter block region)``,
    so it depends on that sample's key alone (not on which other samples share the pass)."""
    counter = tf.constant([0, region], tf.uint64)
    rows = [
        tf.raw_ops.StatelessRandomUniformFullIntV2(shape=[n], key=key, counter=counter, alg=_PHILOX, dtype=tf.uint32)
        for key in keys
    ]
    return rows[0][None] if len(rows) == 1 else tf.stack(rows)


def keep_plan(keep: Fraction) -> tuple[int, int, int]:
    """How :func:`keep_mask` draws Bernoulli(``keep``), ``0 < keep < 1``: ``(bits, threshold, rest)``.

    ``keep`` is taken to 80 binary digits (exact for every float64 rate in [2**-27, 1]; below that the
    error is under 2**-80). A draw keeps the element when a uniform ``bits``-bit field is below ``threshold``:
    exact when ``keep`` is a multiple of 2**-bits (``rest == 0``; 0.5 -> 1 bit, 0.75 -> 2 bits, multiples of
    1/256 -> 8 bits). Otherwise ``bits == 16`` and a field equal to ``threshold`` (a tie, probability 2**-16)
    is resolved by 64 more bits compared with ``rest`` (keep's binary digits 17..80).
    """
    return _seeds.keep_plan(keep, 80, (1, 2, 4, 8, _TIE_BITS))


def _field_table(bits: int, threshold: int) -> np.ndarray:
    """``(256, 8 // bits)`` -1/0 (all bits set when kept): whether each ``bits``-bit field of a byte value is
    below ``threshold``."""
    fields = (np.arange(256)[:, None] >> (bits * np.arange(8 // bits))[None]) & ((1 << bits) - 1)
    return -(fields < threshold).astype(np.int64)


def _pool_size(m: int) -> int:
    """Word pairs per sample reserved for ties: far above the expected ``m / 65536`` ties."""
    return 2 * -(-m // (1 << _TIE_BITS)) + 16


def words_needed(m: int, keep: Fraction) -> int:
    """Philox words one sample's draw of ``m`` elements takes (first-stage fields, then the tie pool)."""
    bits, _, rest = keep_plan(keep)
    first = -(-m * bits // 32) if bits <= 8 else -(-m // 2)
    return first + (2 * _pool_size(m) if rest else 0)


def _resolve_ties(below: tf.Tensor, ties: tf.Tensor, pool: tf.Tensor, keys: Sequence[tf.Tensor], rest: int,
                  region: int) -> tf.Tensor:
    """Settle the 16-bit ties of :func:`keep_bits` with two more uniform 32-bit words each (exact).

    The ``r``-th tie of sample ``j`` (row-major order) takes word pair ``r`` of its ``pool`` (``(k, P, 2)``,
    drawn with the first-stage words); a tie beyond the pool takes the pair at its own position from Philox
    block ``region + 2`` (never seen in practice, but exact). Either way the words depend only on the sample's
    key and its tie positions, so grouping into passes does not matter.
    """
    k, m, pool_size = len(keys), int(below.shape[1]), int(pool.shape[1])
    mid, low = rest >> 32, rest & 0xFFFFFFFF

    def resolve() -> tf.Tensor:
        where = tf.where(ties)  # (T, 2) int64, row-major: sample, position
        rows = where[:, 0]
        order = tf.range(tf.shape(where, out_type=tf.int64)[0])
        rank = order - tf.gather(tf.math.unsorted_segment_min(order, rows, k), rows)
        words = tf.gather_nd(pool, tf.stack([rows, tf.minimum(rank, pool_size - 1)], axis=1))
        spill = rank >= pool_size
        def overflow() -> tf.Tensor:
            own = tf.gather_nd(tf.reshape(philox_words(keys, 2 * m, region + 2), [k, m, 2]), where)
            return tf.where(spill[:, None], own, words)

        words = tf.cond(tf.reduce_any(spill), overflow, lambda: words)
        first, second = words[:, 0], words[:, 1]
        kept = (first < tf.constant(mid, tf.uint32)) | (
            (first == tf.constant(mid, tf.uint32)) & (second < tf.constant(low, tf.uint32)))
        return tf.tensor_scatter_nd_update(below, where, kept)

    return tf.cond(tf.reduce_any(ties), resolve, lambda: below)


def bits_from_words(words: tf.Tensor, keys: Sequence[tf.Tensor], m: int, keep: Fraction, region: int,
                    itype: Any = tf.int32) -> tf.Tensor:
    """:func:`keep_bits` from already drawn words: ``words`` is ``(k, words_needed(m, keep))`` uint32, row ``j``
    from sample ``j``'s stream."""
    k = len(keys)
    bits, threshold, rest = keep_plan(keep)
    if int(words.shape[1]) != words_needed(m, keep):
        raise ValueError(f"expected {words_needed(m, keep)} words per sample for {m} draws, got {words.shape[1]}")
    if bits <= 8:  # a byte holds 8 // bits fields: one table lookup gives all of them
        n = -(-m * bits // 32)
        octets = tf.reshape(tf.bitcast(words, tf.uint8), [k, 4 * n])
        table = tf.constant(_field_table(bits, threshold), dtype=itype)
        flat = tf.reshape(tf.gather(table, tf.cast(octets, tf.int32)), [k, 32 * n // bits])
    else:
        n = -(-m // 2)
        fields = tf.reshape(tf.bitcast(words[:, :n] if rest else words, tf.uint16), [k, 2 * n])
        if 2 * n != m:
            fields = fields[:, :m]
        below = fields < tf.constant(threshold, tf.uint16)
        if rest:
            pool = tf.reshape(words[:, n:], [k, _pool_size(m), 2])
            below = _resolve_ties(below, tf.equal(fields, tf.constant(threshold, tf.uint16)), pool, keys, rest, region)
        flat = tf.where(below, tf.constant(-1, itype), tf.constant(0, itype))
    return flat if int(flat.shape[1]) == m else flat[:, :m]


def keep_bits(keys: Sequence[tf.Tensor], m: int, keep: Fraction, region: int, itype: Any = tf.int32) -> tf.Tensor:
    """``(k, m)`` independent Bernoulli(``keep``) draws in the integer type ``itype``: all bits set (-1) for a
    kept element, 0 for a dropped one (an AND mask for a float of the same width). Row ``j`` comes from
    ``keys[j]`` alone.

    Exact in distribution (see :func:`keep_plan`): ``bits`` random bits per element instead of a float32
    uniform — 1/32 of a Philox word per element at keep 0.5, 1/16 at 0.75, 1/2 for a non-dyadic keep.
    Words from Philox block ``region`` (ties beyond the pool: ``region + 2``); the fast suffix instead draws
    the words of all its dropout calls at once (:func:`bits_from_words`).
    """
    return bits_from_words(philox_words(keys, words_needed(m, keep), region), keys, m, keep, region, itype)


def keep_mask(keys: Sequence[tf.Tensor], m: int, keep: Fraction, region: int, dtype: Any = tf.float32) -> tf.Tensor:
    """:func:`keep_bits` as 0/1 values in ``dtype``, shape ``(k, m)``."""
    return tf.cast(tf.not_equal(keep_bits(keys, m, keep, region), 0), dtype)


_INT_OF = {2: tf.int16, 4: tf.int32, 8: tf.int64}


def mask_shape(layer: Any, per_sample: tuple[int, ...]) -> tuple[int, ...]:
    """The mask shape of one sample (``per_sample`` = its ``(N, ...)`` input shape), as Keras broadcasts it."""
    kind, rank = type(layer), len(per_sample)
    if kind is keras.layers.Dropout:
        if layer.noise_shape is None:
            return per_sample
        return tuple(d if v is None else int(v) for v, d in zip(layer.noise_shape, per_sample))
    if kind is keras.layers.SpatialDropout1D or layer.data_format == "channels_last":
        return (per_sample[0],) + (1,) * (rank - 2) + (per_sample[-1],)
    return (per_sample[0], per_sample[1]) + (1,) * (rank - 2)


def fast_problem(step: Any) -> str | None:
    """Why ``step`` cannot use :func:`fast_dropout` (None: it can). Decided on the symbolic graph."""
    op, node = step.op, step.node
    if node is None or type(op) not in FAST_TYPES:
        return f"{op.name}: {type(op).__name__} runs natively"
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if len(args) != 1 or set(kwargs) - {"training"} or len(step.reads) != 1:
        return f"{op.name}: called with arguments other than one tensor"
    spec = node.input_tensors[0]
    shape, dtype = tuple(spec.shape), keras.backend.standardize_dtype(spec.dtype)
    if "float" not in dtype:
        return f"{op.name}: input dtype {dtype}"
    if len(shape) < 2 or any(d is None for d in shape[1:]):
        return f"{op.name}: input shape {shape} not static"
    if type(op) in _SPATIAL_RANK:
        if len(shape) != _SPATIAL_RANK[type(op)] or (type(op) is not keras.layers.SpatialDropout1D
                                                     and op.data_format not in ("channels_last", "channels_first")):
            return f"{op.name}: {len(shape)}-D input"
    elif op.noise_shape is not None:
        noise = tuple(op.noise_shape)
        if len(noise) != len(shape) or noise[0] not in (None, 1) or any(
                v is not None and v != 1 and v != d for v, d in zip(noise[1:], shape[1:])):
            return f"{op.name}: noise_shape {noise} for inputs {shape}"
    if not (0 <= op.rate <= 1):
        return f"{op.name}: rate {op.rate}"
    return None


def fast_signature(layer: Any) -> tuple:
    """What a traced :func:`fast_dropout` baked in: a change (e.g. of ``rate``) needs a new trace."""
    return (layer.rate, getattr(layer, "noise_shape", None), getattr(layer, "data_format", None))


def fast_dropout(x: tf.Tensor, layer: Any, keys: Sequence[tf.Tensor] | None, copies: int, broadcast: bool,
                 region: int, words: tf.Tensor | None = None) -> tuple[tf.Tensor, bool]:
    """``layer(x, training=True)`` for ``copies`` samples at once, sample ``j``'s mask from ``keys[j]``.

    The same values as Keras' dropout (``where(U >= rate, x * scale, 0)`` with ``scale = 1 / (1 - rate)``:
    kept elements are ``x * scale`` bit for bit, dropped ones +0.0, applied as an AND of the float's bits)
    and the same distribution of masks (Bernoulli(1 - rate) per noise-shape element, exact:
    :func:`keep_bits`).

    Shape:
        x: ``(N, ...)`` when ``broadcast`` (the same rows for every copy: the mask is broadcast against them
        instead of materialising ``copies`` copies), else ``(copies * N, ...)``. Returns ``(out, broadcast)``:
        ``(copies * N, ...)`` and False, or ``x`` itself (and ``broadcast`` unchanged) when dropout is
        inactive (``keys is None``) or the rate is 0. ``words``: this call's ``(copies, words_needed(...))``
        slice of the samples' streams (else drawn from Philox block ``region``).
    """
    if layer._convert_input_args:  # what Layer.__call__ does first (mixed precision: cast to compute dtype)
        x = layer.dtype_policy.convert_input(x, layer.autocast, layer.input_dtype)
    rows = int(x.shape[0]) if broadcast else int(x.shape[0]) // copies
    per_sample = (rows,) + tuple(int(d) for d in x.shape[1:])
    if keys is None or layer.rate == 0:
        return x, broadcast
    if layer.rate == 1:
        return _record(tf.zeros((copies * rows,) + per_sample[1:], x.dtype)), False
    noise = mask_shape(layer, per_sample)
    keep = 1 - Fraction(layer.rate)  # the exact probability of Keras' U >= rate
    itype = _INT_OF[x.dtype.size]
    m = math.prod(noise)
    bits = keep_bits(keys, m, keep, region, itype) if words is None else bits_from_words(
        words, keys, m, keep, region, itype)
    mask = tf.reshape(bits, (copies,) + noise)
    scaled = tf.bitcast(x * tf.constant(1 / (1 - layer.rate), x.dtype), itype)  # as Keras: x * scale, then select
    out = tf.bitwise.bitwise_and(scaled[None] if broadcast else tf.reshape(scaled, (copies,) + per_sample), mask)
    return _record(tf.bitcast(tf.reshape(out, (copies * rows,) + per_sample[1:]), x.dtype)), False
