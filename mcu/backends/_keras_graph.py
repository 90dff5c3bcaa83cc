"""Graph surgery for Keras 3 Functional and Sequential models: prefix caching and a bf16 copy.

**Prefix caching.** Everything in the graph that is not downstream of a dropout site (:mod:`._keras_mc`) is a
deterministic function of the input. :func:`split_model` cuts the graph there: :meth:`KerasSplit.prefix` runs
the deterministic part once on the ``N`` inputs (inference mode) and returns the *frontier* — every
deterministic tensor that the stochastic part reads, model inputs and masks included. The caller stacks ``k``
copies of each frontier tensor along the batch axis (``[a; a; ...; a]``, ``k * N`` rows) and
:meth:`KerasSplit.suffix` runs the stochastic rest on them. Exact: the prefix is a deterministic function of
the input, and each row of the repeated frontier meets its own dropout masks, as in the vectorized strategy
(with the same seed state the masks are even the same ones, since the dropout layers see the same shapes).

How: our own executor over the functional graph (``model._nodes_by_depth``), mirroring Keras'
``Functional._run_through_graph``: the very same layer objects are called with the recorded arguments and
``training=False``; inside :func:`._keras_mc.active` (the suffix's MC passes) the sites run with
``training=True``, elsewhere this is the deterministic inference pass. Nothing in the user's model is
modified (no new nodes are created, unlike ``keras.Model(intermediate_tensors, outputs)``; no variable is
written).

Nested Functional/Sequential models that contain dropout are *inlined* (their own graph is executed step by
step, so a deterministic backbone inside a nested model is cached too); nested models without dropout and
other layers run as one opaque step; a subclassed layer or model that holds a site is stochastic as a whole.
Rate-0 dropout layers are not sites: they are identities and the prefix runs through them.

Usage (what the backend / a "prefix" strategy calls)::

    split, reason = prefix_split(model, x)      # cached per model; None + reason -> use another strategy
    frontier = split.prefix(x)                  # list[tf.Tensor], each with N rows
    with backend.mc_mode(model), backend.seeded(model, seed):
        rows = [backend.repeat(f, k) for f in frontier]
        out = split.suffix(rows)                # (k * N, *out): sample j is out[j * N:(j + 1) * N]
        out = split.sample(frontier, keys)      # the same with fast masks, sample j from keys[j]

**Fast exact masks.** :meth:`KerasSplit.sample` runs the suffix with ``Dropout`` and
``SpatialDropout1D/2D/3D`` layers (exact classes, plain calls, static per-example shapes) replaced by
:func:`fast_dropout`: sample ``j``'s masks come from its own Philox key (one stateless draw per sample per
block), using only a few random bits per element (:func:`keep_plan`: 1 bit at rate 0.5, 2 at 0.25, 16 plus
exact tie resolution for other rates) — exact Bernoulli(1 - rate) draws, Keras' ``noise_shape`` and
``data_format`` broadcasting, Keras' output values. The frontier is passed unrepeated and the masks are
broadcast against it; it is repeated only for a reader that is not a fast dropout. Other sites
(GaussianDropout, AlphaDropout, RNN and attention dropout, dropout inside an opaque layer) run as layers,
switched on, with draws from the block's first key: :attr:`KerasSplit.native_rng`.

**bf16.** :func:`bf16_clone` builds a copy of a Functional/Sequential model under the ``"mixed_bfloat16"``
dtype policy (weights copied, global policy restored), cached per model.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Hashable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import tree

from mcu.backends import _keras_mc, _keys

__all__ = [
    "DROPOUT_TYPES",
    "FAST_TYPES",
    "activation_bytes",
    "bits_from_words",
    "KerasSplit",
    "Unsplittable",
    "bf16_clone",
    "fast_dropout",
    "forget_bf16",
    "keep_bits",
    "keep_mask",
    "keep_plan",
    "words_needed",
    "prefix_split",
    "sample_keys",
    "split_model",
]

#: Dropout-family layers (SpatialDropout1D/2D/3D subclass ``keras.layers.Dropout``). Same set as the backend's.
DROPOUT_TYPES: tuple[type, ...] = _keras_mc.DROPOUT_TYPES

_MISSING = object()
_Key = tuple  # (scope, id(KerasTensor)): scope tells apart the calls of an inlined nested model


class Unsplittable(Exception):
    """The model has no usable deterministic prefix; ``str(exc)`` says why (used as the reason string)."""


# --------------------------------------------------------------------------------------------------------------
# Keras internals we rely on, in one place
# --------------------------------------------------------------------------------------------------------------

def _graph_of(model: Any) -> Any:
    """The Functional graph that ``model.call`` runs unchanged, or raise :class:`Unsplittable`."""
    from keras.src.models.functional import Functional
    from keras.src.models.sequential import Sequential

    if isinstance(model, Sequential):
        if type(model).call is not Sequential.call:
            raise Unsplittable(f"{type(model).__qualname__} overrides Sequential.call: its graph is not what runs")
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise Unsplittable(
                f"Sequential model {model.name!r} has no graph yet (no Input and never called): nothing to split"
            )
        return graph
    if isinstance(model, Functional):
        if type(model).call is not Functional.call:
            raise Unsplittable(f"{type(model).__qualname__} overrides Functional.call: its graph is not what runs")
        return model
    raise Unsplittable(
        f"{type(model).__qualname__} is not a Functional or Sequential model (a subclassed model has no graph "
        "to split)"
    )


def _standardize(model: Any, graph: Any, inputs: Any) -> list:
    """What ``model.__call__`` does to its inputs before running the graph (dtype conversion, rank fix)."""
    if getattr(model, "_convert_input_args", False):  # Layer.__call__ step 1 (Sequential; Functional opts out)
        policy, autocast, dtype = model.dtype_policy, model.autocast, model.input_dtype
        inputs = tree.map_structure(lambda t: policy.convert_input(t, autocast, dtype), inputs)
    return list(graph._standardize_inputs(inputs))


@contextlib.contextmanager
def _as_model_call(model: Any) -> Iterator[None]:
    """The context an outer ``model(x, training=False)`` call establishes for the layers it calls.

    Layers that take no ``training`` argument but hold sub-layers that do get ``training=False`` from this
    call context, as in a full pass; a mixed-precision model's autocast scope is entered as Keras does.
    """
    from keras.src.backend import AutocastScope, get_autocast_scope
    from keras.src.backend.common import global_state
    from keras.src.layers.layer import CallContext

    with contextlib.ExitStack() as stack:
        if global_state.get_global_attribute("current_call_ctx") is None:
            context = CallContext(entry_layer=model)
            context.set_value("training", False)
            global_state.set_global_attribute("current_call_ctx", context)
            stack.callback(global_state.set_global_attribute, "current_call_ctx", None)
        if get_autocast_scope() is None and model.autocast and model.compute_dtype != model.variable_dtype:
            stack.enter_context(AutocastScope(model.compute_dtype))
        yield


def _holds_site(op: Any, sites: frozenset[int]) -> bool:
    """Whether ``op`` is a dropout site (:mod:`._keras_mc`) or holds one."""
    if id(op) in sites:
        return True
    flatten = getattr(op, "_flatten_layers", None)
    return flatten is not None and any(id(layer) in sites for layer in flatten(include_self=True))


# --------------------------------------------------------------------------------------------------------------
# The program: the graph flattened into steps that read and write keyed values
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    run: Callable[[list], list]
    reads: tuple[_Key, ...]
    writes: tuple[_Key, ...]
    source: bool  # a dropout site, or an opaque layer holding one
    compute: bool  # False for bookkeeping (entering / leaving an inlined model)
    op: Any
    label: str
    node: Any = None  # the graph node of a plain layer call (None for bookkeeping steps)


def _call_step(node: Any, scope: tuple, sites: frozenset[int]) -> _Step:
    op = node.operation
    inputs = list(node.input_tensors)
    inject_training = "training" in getattr(op, "_call_context_args", ())

    def run(values: list) -> list:
        args, kwargs = node.arguments.fill_in({id(kt): v for kt, v in zip(inputs, values)})
        if inject_training:  # as Functional.call's operation_fn does with the model's training=False
            kwargs["training"] = False
        return tree.flatten(op(*args, **kwargs))

    return _Step(
        run, tuple((scope, id(t)) for t in inputs), tuple((scope, id(t)) for t in node.outputs),
        source=_holds_site(op, sites), compute=True, op=op, label=op.name, node=node,
    )


def _inlinable(node: Any, sites: frozenset[int]) -> Any:
    """The graph of a nested Functional/Sequential model worth inlining at ``node``, else None."""
    op = node.operation
    if not isinstance(op, keras.Model) or not _holds_site(op, sites) or "call" in op.__dict__:
        return None
    try:
        graph = _graph_of(op)
    except Unsplittable:
        return None
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if len(args) != 1 or any(k not in ("training", "mask") for k in kwargs) or kwargs.get("mask") is not None:
        return None
    return graph


def _emit(graph: Any, scope: tuple, sites: frozenset[int], steps: list[_Step], known: set) -> None:
    """Append the steps of ``graph`` (its inputs already written under ``scope``) in Keras' execution order."""
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any((scope, id(t)) not in known for t in node.input_tensors):
                continue  # as Keras: not computable from the given inputs
            inner = _inlinable(node, sites)
            if inner is None:
                step = _call_step(node, scope, sites)
                steps.append(step)
                known.update(step.writes)
                continue
            nested, inner_scope = node.operation, scope + (id(node),)
            inputs = list(node.input_tensors)

            def enter(values: list, node=node, inputs=inputs, nested=nested, inner=inner) -> list:
                args, _ = node.arguments.fill_in({id(kt): v for kt, v in zip(inputs, values)})
                return _standardize(nested, inner, args[0])

            steps.append(_Step(
                enter, tuple((scope, id(t)) for t in inputs), tuple((inner_scope, id(t)) for t in inner.inputs),
                source=False, compute=False, op=nested, label=f"enter {nested.name}",
            ))
            known.update(steps[-1].writes)
            _emit(inner, inner_scope, sites, steps, known)
            steps.append(_Step(
                lambda values: list(values), tuple((inner_scope, id(t)) for t in inner.outputs),
                tuple((scope, id(t)) for t in node.outputs), source=False, compute=False, op=nested,
                label=f"leave {nested.name}",
            ))
            known.update(steps[-1].writes)


def _symbols(graph: Any, scope: tuple, sites: frozenset[int], table: dict) -> None:
    """Map every key of the (inlined) program to its KerasTensor, for shapes and tests."""
    for t in graph.inputs:
        table[(scope, id(t))] = t
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            for t in node.outputs:
                table[(scope, id(t))] = t
            inner = _inlinable(node, sites) if node.operation and not node.is_input else None
            if inner is not None:
                _symbols(inner, scope + (id(node),), sites, table)


# --------------------------------------------------------------------------------------------------------------
# Fast exact dropout masks: one Philox stream per sample, a few random bits per element
# --------------------------------------------------------------------------------------------------------------

#: Layer classes whose training-mode call :func:`fast_dropout` reproduces. Exact classes only: a subclass may
#: override ``call``. GaussianDropout and AlphaDropout keep running natively (Keras seed generators).
FAST_TYPES: tuple[type, ...] = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
)
_SPATIAL_RANK = {keras.layers.SpatialDropout1D: 3, keras.layers.SpatialDropout2D: 4, keras.layers.SpatialDropout3D: 5}
_PHILOX = 1  # tf.random.Algorithm.PHILOX
_REGIONS = 4  # Philox counter blocks per dropout call (block 0: the words of all fast dropouts of a sample;
#               4 * i + 2: tie overflow of suffix step i)
_TIE_BITS = 16


def sample_keys(seeds: Sequence[int]) -> tf.Tensor:
    """One Philox key per sample seed, shape ``(k, 1)`` uint64 (:func:`mcu.backends._keys.sample_keys`)."""
    return tf.constant(_keys.sample_keys(seeds).reshape(-1, 1))


def _words(keys: Sequence[tf.Tensor], n: int, region: int) -> tf.Tensor:
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
    q = math.floor(Fraction(keep) * (1 << 80))
    for bits in (1, 2, 4, 8, _TIE_BITS):
        if q % (1 << (80 - bits)) == 0:
            return bits, q >> (80 - bits), 0
    return _TIE_BITS, q >> (80 - _TIE_BITS), q & ((1 << (80 - _TIE_BITS)) - 1)


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
            own = tf.gather_nd(tf.reshape(_words(keys, 2 * m, region + 2), [k, m, 2]), where)
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
    return bits_from_words(_words(keys, words_needed(m, keep), region), keys, m, keep, region, itype)


def keep_mask(keys: Sequence[tf.Tensor], m: int, keep: Fraction, region: int, dtype: Any = tf.float32) -> tf.Tensor:
    """:func:`keep_bits` as 0/1 values in ``dtype``, shape ``(k, m)``."""
    return tf.cast(tf.not_equal(keep_bits(keys, m, keep, region), 0), dtype)


_INT_OF = {2: tf.int16, 4: tf.int32, 8: tf.int64}


def _noise_shape(layer: Any, per_sample: tuple[int, ...]) -> tuple[int, ...]:
    """The mask shape of one sample (``per_sample`` = its ``(N, ...)`` input shape), as Keras broadcasts it."""
    kind, rank = type(layer), len(per_sample)
    if kind is keras.layers.Dropout:
        if layer.noise_shape is None:
            return per_sample
        return tuple(d if v is None else int(v) for v, d in zip(layer.noise_shape, per_sample))
    if kind is keras.layers.SpatialDropout1D or layer.data_format == "channels_last":
        return (per_sample[0],) + (1,) * (rank - 2) + (per_sample[-1],)
    return (per_sample[0], per_sample[1]) + (1,) * (rank - 2)


def fast_problem(step: "_Step") -> str | None:
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


def _fast_signature(layer: Any) -> tuple:
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
    noise = _noise_shape(layer, per_sample)
    keep = 1 - Fraction(layer.rate)  # the exact probability of Keras' U >= rate
    itype = _INT_OF[x.dtype.size]
    m = math.prod(noise)
    bits = keep_bits(keys, m, keep, region, itype) if words is None else bits_from_words(
        words, keys, m, keep, region, itype)
    mask = tf.reshape(bits, (copies,) + noise)
    scaled = tf.bitcast(x * tf.constant(1 / (1 - layer.rate), x.dtype), itype)  # as Keras: x * scale, then select
    out = tf.bitwise.bitwise_and(scaled[None] if broadcast else tf.reshape(scaled, (copies,) + per_sample), mask)
    return _record(tf.bitcast(tf.reshape(out, (copies * rows,) + per_sample[1:]), x.dtype)), False


# --------------------------------------------------------------------------------------------------------------
# Activation metering (a rough per-pass memory estimate for the auto strategy's budget)
# --------------------------------------------------------------------------------------------------------------

_record = _keras_mc.record


def activation_bytes(run: Callable[[], Any]) -> int:
    """Bytes of the leaf-layer outputs (and fast-dropout / repeated tensors) of ``run()``, from static shapes.

    ``run`` is traced into a throwaway graph and never executed: no activation memory is allocated (an eager
    pass would peak at about its activations) and no random state moves. Metering is local to this context
    (:func:`._keras_mc.metering`): the backend's functions run their Python meanwhile, other threads' calls
    are neither counted nor changed.
    """
    with _keras_mc.metering() as meter:
        tf.function(lambda: (run(), None)[1], autograph=False).get_concrete_function()
    return meter[0]


# --------------------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------------------

def _host(t: Any) -> tuple[np.ndarray, float]:
    """A float64 numpy copy of an output tensor and the relative tolerance its dtype allows."""
    t = tf.convert_to_tensor(t)
    low = t.dtype in (tf.bfloat16, tf.float16)
    return tf.cast(t, tf.float64).numpy() if t.dtype.is_floating else t.numpy(), (2e-2 if low else 1e-4)


class KerasSplit:
    """A Keras model cut into a deterministic prefix and a stochastic suffix (see the module docstring).

    Attributes:
        frontier_tensors: the symbolic ``KerasTensor`` of each frontier entry, in :meth:`prefix` order (those
            of an inlined nested model belong to that model's graph).
        n_prefix_ops / n_suffix_ops: number of layer/operation calls on each side.
        dropout_layers: the dropout-family layers the suffix runs (including those inside opaque layers).

    Holds the model weakly (a cache keyed by the model does not keep it alive).
    """

    def __init__(self, model: Any, sites: "_keras_mc.Sites | None" = None) -> None:
        graph = _graph_of(model)
        sites = _keras_mc.find_sites(model) if sites is None else sites
        ids = sites.ids
        self._model = weakref.ref(model)
        self._graph = None if graph is model else graph  # never hold the model itself strongly
        steps: list[_Step] = []
        self._input_keys = [((), id(t)) for t in graph.inputs]
        _emit(graph, (), ids, steps, set(self._input_keys))
        self._output_keys = [((), id(t)) for t in graph.outputs]
        self._outputs_struct = graph._outputs_struct

        stochastic: set = set()
        prefix, suffix = [], []
        for step in steps:
            if step.source or any(key in stochastic for key in step.reads):
                stochastic.update(step.writes)
                suffix.append(step)
            else:
                prefix.append(step)
        if not suffix:
            raise Unsplittable("no dropout site in the model's graph: nothing is stochastic")
        if not any(step.compute for step in prefix):
            raise Unsplittable(
                f"the first operation after every input is stochastic ({suffix[0].label}): no deterministic "
                "prefix to cache"
            )
        written = {key for step in suffix for key in step.writes}
        frontier: dict[_Key, None] = {}
        for key in [k for step in suffix for k in step.reads] + self._output_keys:
            if key not in written:
                frontier.setdefault(key, None)
        self._prefix_steps, self._suffix_steps = prefix, suffix
        self._frontier = list(frontier)
        table: dict = {}
        _symbols(graph, (), ids, table)
        self.frontier_tensors = [table[key] for key in self._frontier]
        self.n_prefix_ops = sum(step.compute for step in prefix)
        self.n_suffix_ops = sum(step.compute for step in suffix)
        seen: dict[int, Any] = {}
        for step in suffix:
            for layer in getattr(step.op, "_flatten_layers", lambda **_: [])(include_self=True):
                if id(layer) in ids:
                    seen.setdefault(id(layer), layer)
        self.dropout_layers = list(seen.values())
        self._sites = sites.without_layers()
        problems = {i: fast_problem(step) for i, step in enumerate(suffix) if step.source}
        self._fast = {i: step.op for i, step in enumerate(suffix) if step.source and problems[i] is None}
        self.native_reasons = [why for why in problems.values() if why is not None]
        #: Some site draws from a seed derived from the block's first key, not from per-sample keys.
        self.native_rng = bool(self.native_reasons)
        # autograph off, as in Keras' own predict/fit functions (its conversion of the executor and the Keras
        # internals it calls cost ~5 MB and time on the first trace, for nothing: no tensor-dependent Python)
        self._prefix_fn = tf.function(self._run_prefix, reduce_retracing=True, autograph=False)
        self._prefix_concrete: dict[Hashable, Callable] = {}
        self._suffix_fns: dict[Hashable, Callable] = {}
        self._sample_fns: dict[Hashable, Callable] = {}
        self._validated: dict[Hashable, str | None] = {}
        self._lock = threading.Lock()

    # -- description ------------------------------------------------------------------------------------------
    @property
    def fast_layers(self) -> list[Any]:
        """The dropout layers whose masks the split draws itself, per sample (the rest run natively)."""
        return list(self._fast.values())

    def describe(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.frontier_tensors)
        first = next(step.label for step in self._suffix_steps if step.compute)
        calls = sum(step.source for step in self._suffix_steps)
        return (
            f"prefix of {self.n_prefix_ops} ops cached, suffix of {self.n_suffix_ops} ops from {first!r} repeated; "
            f"frontier: {len(self._frontier)} tensor(s) {shapes}; fast per-sample masks in {len(self._fast)} of "
            f"{calls} dropout call(s)"
            + (f" (native: {'; '.join(self.native_reasons)})" if self.native_reasons else "")
        )

    def __repr__(self) -> str:
        return f"<KerasSplit {self.describe()}>"

    # -- execution --------------------------------------------------------------------------------------------
    def _model_or_raise(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("KerasSplit: the model was garbage-collected")
        return model

    def _run(self, steps: list[_Step], env: dict) -> None:
        for step in steps:
            outputs = step.run([env[key] for key in step.reads])
            env.update(zip(step.writes, outputs))

    def _run_prefix(self, x: Any) -> list:
        model = self._model_or_raise()
        with _as_model_call(model), _keras_mc.active(self._sites, None, force=False):  # inference, nothing written
            env = dict(zip(self._input_keys, _standardize(model, model if self._graph is None else self._graph, x)))
            self._run(self._prefix_steps, env)
        return [env[key] for key in self._frontier]

    def _run_suffix(self, frontier: list, key: tf.Tensor | None = None) -> Any:
        """The suffix as layers: an MC pass with draws from ``key`` (``(1,)`` uint64), or inference (None)."""
        model = self._model_or_raise()
        with _as_model_call(model), _keras_mc.active(self._sites, key, force=key is not None):
            env = dict(zip(self._frontier, frontier))
            self._run(self._suffix_steps, env)
        outputs = tree.pack_sequence_as(self._outputs_struct, [env[key] for key in self._output_keys])
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    def _run_fast(self, frontier: list, keys: tf.Tensor | None, copies: int | None = None,
                  broadcast: bool = True, reached: set[int] | None = None) -> Any:
        """The suffix with :func:`fast_dropout` in place of the dropout layers that allow it (other sites run
        as layers, switched on with draws from the first sample's key: :func:`._keras_mc.active`). With
        ``broadcast`` the frontier has ``N`` rows and stands for ``copies`` stacked copies: a tensor is repeated
        only when something other than a fast dropout reads it. ``keys=None``: every site inactive
        (validation), ``copies`` then given. ``reached`` collects the ids of the sites that ran."""
        model = self._model_or_raise()
        key_list = None if keys is None else tf.unstack(keys)
        copies = len(key_list) if key_list is not None else int(copies)
        words = {}
        if key_list is not None:  # one Philox call per sample for all fast dropouts (fewer ops per block)
            rows = int(frontier[0].shape[0]) // (1 if broadcast else copies)
            sizes = {}
            for index, layer in self._fast.items():
                if 0 < layer.rate < 1:
                    spec = self._suffix_steps[index].node.input_tensors[0]
                    per_sample = (rows,) + tuple(int(d) for d in spec.shape[1:])
                    sizes[index] = words_needed(math.prod(_noise_shape(layer, per_sample)), 1 - Fraction(layer.rate))
            if sizes:
                drawn, start = _words(key_list, sum(sizes.values()), 0), 0
                for index, size in sizes.items():
                    words[index], start = drawn[:, start:start + size], start + size
        if reached is not None and key_list is not None:
            reached.update(id(layer) for layer in self._fast.values())
        key = None if key_list is None else key_list[0]
        with _as_model_call(model), _keras_mc.active(self._sites, key, force=key is not None, reached=reached):
            env = dict(zip(self._frontier, frontier))
            lazy = set(self._frontier) if broadcast else set()

            def full(key: _Key) -> Any:
                if key in lazy:
                    value = env[key]
                    env[key] = _record(tf.tile(value, [copies] + [1] * (len(value.shape) - 1)))
                    lazy.discard(key)
                return env[key]

            for index, step in enumerate(self._suffix_steps):
                layer = self._fast.get(index)
                if layer is None:
                    env.update(zip(step.writes, step.run([full(key) for key in step.reads])))
                    continue
                (read,), (write,) = step.reads, step.writes
                env[write], still = fast_dropout(env[read], layer, key_list, copies, read in lazy, _REGIONS * index,
                                                 words.get(index))
                if still:
                    lazy.add(write)
            values = [full(key) for key in self._output_keys]
        outputs = tree.pack_sequence_as(self._outputs_struct, values)
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    def sample(self, frontier: Sequence[tf.Tensor], keys: tf.Tensor, broadcast: bool = True) -> Any:
        """``k = len(keys)`` samples of the stochastic part, sample ``j``'s fast dropout masks from ``keys[j]``.

        Sites without a fast path draw from ``keys[0]`` (see :attr:`native_rng`). One concrete function per
        block size ``k``, dropout configuration and frontier shapes; ``keys`` is a tensor, so seeds never
        retrace. Raises :class:`~mcu.errors.NoDropoutError` (or warns) when, traced, some site never ran.

        Shape:
            frontier: list of ``(N, *frontier_shape_i)`` (:meth:`prefix`; ``broadcast``) or of
            ``(k * N, ...)`` stacked copies; keys: ``(k, 1)`` uint64 (:func:`sample_keys`) -> ``(k * N, *out)``.
        """
        frontier = list(frontier)
        if _keras_mc.metering_now() or tf.config.functions_run_eagerly():  # e.g. metering: run the Python
            return self._run_fast(frontier, keys, broadcast=broadcast)
        state = (int(keys.shape[0]), broadcast, self._sites.signature,
                 tuple(_fast_signature(layer) for layer in self._fast.values()),
                 tuple((tuple(f.shape), f.dtype) for f in frontier))
        concrete = self._sample_fns.get(state)
        if concrete is None:  # a concrete function: no signature matching on every block (~60 us)
            with self._lock:
                concrete = self._sample_fns.get(state)
                if concrete is None:
                    reached: set[int] = set()
                    function = tf.function(lambda frontier, keys: self._run_fast(frontier, keys, broadcast=broadcast,
                                                                                 reached=reached), autograph=False)
                    concrete = function.get_concrete_function(frontier, keys)
                    _keras_mc.check_reached(self.dropout_layers, reached, "the split's stochastic part")
                    self._sample_fns[state] = concrete
        return concrete(frontier, keys)

    def prefix(self, x: Any) -> list[tf.Tensor]:
        """The frontier for inputs ``x`` (the model's input structure, ``N`` rows): deterministic, inference mode.

        Shape:
            x: ``(N, *input_shape)`` -> a list of ``(N, *frontier_shape_i)`` tensors.
        """
        if not tf.is_tensor(x) or tf.config.functions_run_eagerly():
            return list(self._prefix_fn(x))
        signature = (tuple(x.shape), x.dtype)
        concrete = self._prefix_concrete.get(signature)
        if concrete is None:  # as in sample(): skip the per-call signature matching
            concrete = self._prefix_concrete.setdefault(signature, self._prefix_fn.get_concrete_function(x))
        return list(concrete(x))

    def suffix(self, frontier: Sequence[tf.Tensor]) -> Any:
        """Run the stochastic part on frontier tensors of ``k * N`` rows (``k`` stacked copies of :meth:`prefix`).

        Inside the backend's ``mc_mode`` for this model, in this context (thread or asyncio task), the sites are
        on, with draws from the session's key stream; elsewhere this is the inference pass. Traced once per
        kind and dropout configuration, so a trace made for one is never reused for the other.

        Shape:
            frontier: list of ``(k * N, *frontier_shape_i)`` -> ``(k * N, *output_shape)`` (the model's output
            structure).
        """
        session = _keras_mc.session(self._model_or_raise())
        stochastic = session is not None and session.mode is not None
        state = (self._sites.signature, stochastic)
        function = self._suffix_fns.get(state)
        if function is None:
            with self._lock:
                function = self._suffix_fns.setdefault(
                    state, tf.function(self._run_suffix, reduce_retracing=True, autograph=False)
                )
        if not stochastic:
            return function(list(frontier))
        return function(list(frontier), session.stream.next_key())

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self, x: Any, copies: int = 2) -> str | None:
        """Check the split on ``x``: ``None`` if it reproduces the model, else the reason it does not.

        Runs ``model(x, training=False)`` and ``copies`` copies through the suffix (the fast executor of
        :meth:`sample` when some dropout has a fast path, else the suffix as layers) with every site inactive
        and compares each copy with the model's
        output (rtol 1e-4 in fp32, 2e-2 in 16-bit). Catches operations in the suffix that depend on the batch
        size. Runs on the first ``min(N, 3)`` rows only (the reference pass is eager: its memory peak grows
        with the rows). Cached per per-example input shapes, dtypes and rows used; the seed state is untouched
        (inactive dropout draws nothing).
        """
        flat = [tf.convert_to_tensor(t) for t in tree.flatten(x)]
        n = min(int(flat[0].shape[0]), 3)
        signature = tuple((tuple(t.shape[1:]), t.dtype.name) for t in flat) + (n, copies)
        if signature in self._validated:
            return self._validated[signature]
        if int(flat[0].shape[0]) != n:
            x = tree.pack_sequence_as(x, [t[:n] for t in flat])
            flat = tree.flatten(x)
        model = self._model_or_raise()
        try:
            with _keras_mc.active(self._sites, None, force=False):  # inference; nothing written (RNN seeds)
                reference = [_host(t) for t in tree.flatten(model(x, training=False))]
                frontier = self.prefix(x)
                bad = [tuple(f.shape) for f in frontier if len(f.shape) == 0 or int(f.shape[0]) != n]
                if bad:
                    raise Unsplittable(f"frontier tensors without the batch axis of {n} rows: {bad}")
                if self._fast:  # what sampling runs: the fast executor (broadcast frontier, dropouts inactive),
                    # eagerly: a throwaway trace would cost graph memory for nothing
                    outs = [self._run_fast(list(frontier), None, copies=copies, broadcast=True)]
                else:
                    outs = [self._run_suffix([tf.tile(f, [copies] + [1] * (len(f.shape) - 1)) for f in frontier])]
            reason = None
            for out in outs:
                for (ref, tol), (val, _) in zip(reference, [_host(t) for t in tree.flatten(out)]):
                    if val.shape != (copies * ref.shape[0],) + ref.shape[1:]:
                        reason = f"suffix output shape {val.shape} != {copies} copies of {ref.shape}"
                        break
                    diff = np.abs(val.reshape((copies,) + ref.shape) - ref[None]) / (np.abs(ref[None]) + 1.0)
                    err = float(np.max(diff)) if diff.size else 0.0
                    if not np.isfinite(err) or err > tol:
                        reason = (f"split output differs from the full pass by {err:.3g} (> {tol:g}): "
                                  "batch-dependent op?")
                        break
                if reason is not None:
                    break
        except Unsplittable as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure means "do not use the split"
            reason = f"the split failed on inputs of shapes {[tuple(t.shape) for t in flat]}: " \
                     f"{type(exc).__name__}: {exc}"
        self._validated[signature] = reason
        return reason


# --------------------------------------------------------------------------------------------------------------
# Cached entry points
# --------------------------------------------------------------------------------------------------------------

_SPLITS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_SPLITS_LOCK = threading.Lock()


def split_model(model: Any, sites: "_keras_mc.Sites | None" = None) -> tuple[KerasSplit | None, str]:
    """Cut ``model`` at its dropout sites (structure only, no validation); cached per model and sites.

    Returns:
        ``(split, description)`` or ``(None, reason)`` — None for a subclassed model (no graph), an unbuilt
        Sequential, a model whose every input goes straight into a dropout site (empty prefix: nothing to
        cache, use the vectorized strategy) or one with no dropout site in its graph.
    """
    sites = _keras_mc.find_sites(model) if sites is None else sites
    with _SPLITS_LOCK:
        entry = _SPLITS.get(model)
        if entry is None or entry["sites"] != sites.signature:
            try:
                split: KerasSplit | None = KerasSplit(model, sites)
                reason = split.describe()
            except Unsplittable as exc:
                split, reason = None, str(exc)
            entry = {"sites": sites.signature, "split": split, "reason": reason}
            try:
                _SPLITS[model] = entry
            except TypeError:  # not weak-referenceable: do not cache
                pass
    return entry["split"], entry["reason"]


def prefix_split(model: Any, x: Any, sites: "_keras_mc.Sites | None" = None) -> tuple[KerasSplit | None, str]:
    """:func:`split_model` then :meth:`KerasSplit.validate` on ``x``: the one call a strategy needs.

    Safe inside or outside ``mc_mode`` and ``seeded`` (validation runs every site inactive and draws no
    random numbers). Returns ``(split, description)`` or ``(None, reason)``.
    """
    split, reason = split_model(model, sites)
    if split is None:
        return None, reason
    problem = split.validate(x)
    if problem is not None:
        return None, problem
    return split, reason


# --------------------------------------------------------------------------------------------------------------
# bf16 copy
# --------------------------------------------------------------------------------------------------------------

_BF16: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_BF16_LOCK = threading.Lock()


@contextlib.contextmanager
def _global_policy(name: str) -> Iterator[None]:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _policy_layer(policy: str) -> Callable[[Any], Any]:
    def clone_layer(layer: Any) -> Any:
        """A fresh copy of ``layer`` whose float32 dtype policy is replaced by ``policy`` (others kept)."""
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer) and layer.dtype_policy.name == "float32":
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    return clone_layer


def _copy_weights(source: Any, target: Any) -> None:
    if len(target.weights) != len(source.weights):
        raise ValueError(f"the clone has {len(target.weights)} weights, the model {len(source.weights)}")
    for mine, theirs in zip(target.weights, source.weights):
        if tuple(mine.shape) != tuple(theirs.shape) or mine.path != theirs.path:
            raise ValueError(f"weight {theirs.path} {tuple(theirs.shape)} != clone's {mine.path} {tuple(mine.shape)}")
        mine.assign(theirs.value)


def _clone_with_policy(model: Any, policy: str) -> Any:
    _graph_of(model)  # Functional or Sequential only (clone_model would rebuild a subclassed one from config)
    with _global_policy(policy):
        clone = keras.models.clone_model(model, clone_function=_policy_layer(policy), recursive=True)
    _copy_weights(model, clone)
    return clone


def precision_clone(model: Any, policy: str = "mixed_bfloat16", sync: bool = True) -> Any:
    """A copy of a Functional/Sequential ``model`` computing under a mixed ``policy`` (variables float32), or None.

    ``policy`` is ``"mixed_bfloat16"`` or ``"mixed_float16"``. Built once with
    ``keras.models.clone_model(..., recursive=True)``, every float32 layer re-created under the policy (the
    global policy is restored afterwards, also on error); cached per model (weakly) and policy. With ``sync``
    (the default) the model's weights — BatchNorm statistics included — are copied into the copy on every
    call, so a model trained further since the last call is never sampled stale (a copy of the float32
    weights: ~1 ms per 10 MB). Outputs are low precision; dropout seed states are the copy's own (seed them
    with the backend's ``seeded(copy, seed)``). None when the model cannot be cloned (subclassed models,
    layers without a working ``get_config``).

    Shape:
        same inputs and outputs as ``model``.
    """
    with _BF16_LOCK:
        clones = _BF16.get(model)
        if clones is not None and policy in clones:
            clone = clones[policy]
            if clone is None or not sync:
                return clone
            try:
                _copy_weights(model, clone)
                return clone
            except ValueError:  # the model's weights changed shape or number: rebuild the copy
                del clones[policy]
        try:
            clone = _clone_with_policy(model, policy)
        except Exception:  # noqa: BLE001 - a model that cannot be cloned simply has no low-precision copy
            clone = None
        try:
            _BF16.setdefault(model, {})[policy] = clone
        except TypeError:
            pass
        return clone


def bf16_clone(model: Any, sync: bool = True) -> Any:
    """:func:`precision_clone` with the ``"mixed_bfloat16"`` policy."""
    return precision_clone(model, "mixed_bfloat16", sync)


def forget_bf16(model: Any) -> None:
    """Drop the cached bf16 copy of ``model``."""
    with _BF16_LOCK:
        _BF16.pop(model, None)
