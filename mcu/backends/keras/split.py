"""Prefix caching for Keras 3 Functional and Sequential models.

**Prefix caching.** Everything in the graph that is not downstream of a dropout site (:mod:`.switches`) is a
deterministic function of the input. :func:`split_model` cuts the graph there: :meth:`KerasSplit.prefix` runs
the deterministic part once on the ``N`` inputs (inference mode) and returns the *frontier* — every
deterministic tensor that the stochastic part reads, model inputs and masks included. The caller stacks ``k``
copies of each frontier tensor along the batch axis (``[a; a; ...; a]``, ``k * N`` rows) and
:meth:`KerasSplit.suffix` runs the stochastic rest on them. Exact: the prefix is a deterministic function of
the input, and each row of the repeated frontier meets its own dropout masks, as in the vectorized strategy
(with the same seed state the masks are even the same ones, since the dropout layers see the same shapes).

How: our own executor over the functional graph (``model._nodes_by_depth``), mirroring Keras'
``Functional._run_through_graph``: the very same layer objects are called with the recorded arguments and
``training=False``; inside :func:`._switches.active` (the suffix's MC passes) the sites run with
``training=True``, elsewhere this is the deterministic inference pass. Nothing in the user's model is
modified (no new nodes are created, unlike ``keras.Model(intermediate_tensors, outputs)``; no variable is
written).

Nested Functional/Sequential models that contain dropout are *inlined* (their own graph is executed step by
step, so a deterministic backbone inside a nested model is cached too); nested models without dropout and
other layers run as one opaque step; a subclassed layer or model that holds a site is stochastic as a whole.
Rate-0 dropout layers are not sites: they are identities and the prefix runs through them.

:meth:`KerasSplit.sample` runs the suffix with the fast dropout of :mod:`.masks` (the frontier is passed
unrepeated and the masks are broadcast against it; it is repeated only for a reader that is not a fast dropout).
Other sites (GaussianDropout, AlphaDropout, RNN and attention dropout, dropout inside an opaque layer) run as
layers, switched on, with draws from the block's first key: :attr:`KerasSplit.native_rng`.
"""

from __future__ import annotations

import math
import threading
import weakref
from fractions import Fraction
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import tensorflow as tf
from keras import tree

from mcu.backends.keras import keys as _keys
from mcu.backends.keras import switches as _switches
from mcu.backends.keras.graph import (
    Key,
    Step,
    Unsplittable,
    as_model_call,
    emit,
    graph_of,
    standardize,
    symbols,
)
from mcu.backends.keras.masks import (
    REGIONS,
    fast_dropout,
    fast_problem,
    fast_signature,
    mask_shape,
    philox_words,
    words_needed,
)

_record = _switches.record

__all__ = ["KerasSplit", "prefix_split", "split_model"]

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

    def __init__(self, model: Any, sites: "_switches.Sites | None" = None) -> None:
        graph = graph_of(model)
        sites = _switches.find_sites(model) if sites is None else sites
        ids = sites.ids
        self._model = weakref.ref(model)
        self._graph = None if graph is model else graph  # never hold the model itself strongly
        steps: list[Step] = []
        self._input_keys = [((), id(t)) for t in graph.inputs]
        emit(graph, (), ids, steps, set(self._input_keys))
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
        frontier: dict[Key, None] = {}
        for key in [k for step in suffix for k in step.reads] + self._output_keys:
            if key not in written:
                frontier.setdefault(key, None)
        self._prefix_steps, self._suffix_steps = prefix, suffix
        self._frontier = list(frontier)
        table: dict = {}
        symbols(graph, (), ids, table)
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
        # autograph off, as in Keras' own predict/fit functions (the executor has no tensor-dependent Python
        # for it to convert)
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

    def _run(self, steps: list[Step], env: dict) -> None:
        for step in steps:
            outputs = step.run([env[key] for key in step.reads])
            env.update(zip(step.writes, outputs))

    def _run_prefix(self, x: Any) -> list:
        model = self._model_or_raise()
        with as_model_call(model), _switches.active(self._sites, None, force=False):  # inference, nothing written
            env = dict(zip(self._input_keys, standardize(model, model if self._graph is None else self._graph, x)))
            self._run(self._prefix_steps, env)
        return [env[key] for key in self._frontier]

    def _run_suffix(self, frontier: list, key: tf.Tensor | None = None) -> Any:
        """The suffix as layers: an MC pass with draws from ``key`` (``(1,)`` uint64), or inference (None)."""
        model = self._model_or_raise()
        seeds = _keys.seed_values(key, self._sites)
        with as_model_call(model), _switches.active(self._sites, seeds, force=key is not None):
            env = dict(zip(self._frontier, frontier))
            self._run(self._suffix_steps, env)
        outputs = tree.pack_sequence_as(self._outputs_struct, [env[key] for key in self._output_keys])
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    def _run_fast(self, frontier: list, keys: tf.Tensor | None, copies: int | None = None,
                  broadcast: bool = True, reached: set[int] | None = None) -> Any:
        """The suffix with :func:`fast_dropout` in place of the dropout layers that allow it (other sites run
        as layers, switched on with draws from the first sample's key: :func:`._switches.active`). With
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
                    sizes[index] = words_needed(math.prod(mask_shape(layer, per_sample)), 1 - Fraction(layer.rate))
            if sizes:
                drawn, start = philox_words(key_list, sum(sizes.values()), 0), 0
                for index, size in sizes.items():
                    words[index], start = drawn[:, start:start + size], start + size
        if reached is not None and key_list is not None:
            reached.update(id(layer) for layer in self._fast.values())
        key = None if key_list is None else key_list[0]
        seeds = _keys.seed_values(key, self._sites)
        with as_model_call(model), _switches.active(self._sites, seeds, force=key is not None, reached=reached):
            env = dict(zip(self._frontier, frontier))
            lazy = set(self._frontier) if broadcast else set()

            def full(key: Key) -> Any:
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
                env[write], still = fast_dropout(env[read], layer, key_list, copies, read in lazy, REGIONS * index,
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
        if _switches.metering_now() or tf.config.functions_run_eagerly():  # e.g. metering: run the Python
            return self._run_fast(frontier, keys, broadcast=broadcast)
        state = (int(keys.shape[0]), broadcast, self._sites.signature,
                 tuple(fast_signature(layer) for layer in self._fast.values()),
                 tuple((tuple(f.shape), f.dtype) for f in frontier))
        concrete = self._sample_fns.get(state)
        if concrete is None:  # a concrete function: no signature matching on every block
            with self._lock:
                concrete = self._sample_fns.get(state)
                if concrete is None:
                    reached: set[int] = set()
                    function = tf.function(lambda frontier, keys: self._run_fast(frontier, keys, broadcast=broadcast,
                                                                                 reached=reached), autograph=False)
                    concrete = function.get_concrete_function(frontier, keys)
                    _switches.check_reached(self.dropout_layers, reached, "the split's stochastic part")
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
        session = _switches.session(self._model_or_raise())
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
            with _switches.active(self._sites, None, force=False):  # inference; nothing written (RNN seeds)
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


def split_model(model: Any, sites: "_switches.Sites | None" = None) -> tuple[KerasSplit | None, str]:
    """Cut ``model`` at its dropout sites (structure only, no validation); cached per model and sites.

    Returns:
        ``(split, description)`` or ``(None, reason)`` — None for a subclassed model (no graph), an unbuilt
        Sequential, a model whose every input goes straight into a dropout site (empty prefix: nothing to
        cache, use the vectorized strategy) or one with no dropout site in its graph.
    """
    sites = _switches.find_sites(model) if sites is None else sites
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


def prefix_split(model: Any, x: Any, sites: "_switches.Sites | None" = None) -> tuple[KerasSplit | None, str]:
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
