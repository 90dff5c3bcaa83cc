"""Graph surgery for Keras 3 Functional and Sequential models: prefix caching and a bf16 copy.

**Prefix caching.** Everything in the graph that is not downstream of a dropout-family layer is a
deterministic function of the input. :func:`split_model` cuts the graph there: :meth:`KerasSplit.prefix` runs
the deterministic part once on the ``N`` inputs (inference mode) and returns the *frontier* — every
deterministic tensor that the stochastic part reads, model inputs and masks included. The caller stacks ``k``
copies of each frontier tensor along the batch axis (``[a; a; ...; a]``, ``k * N`` rows) and
:meth:`KerasSplit.suffix` runs the stochastic rest on them. Exact: the prefix is a deterministic function of
the input, and each row of the repeated frontier meets its own dropout masks, as in the vectorized strategy
(with the same seed state the masks are even the same ones, since the dropout layers see the same shapes).

How: our own executor over the functional graph (``model._nodes_by_depth``), mirroring Keras'
``Functional._run_through_graph``: the very same layer objects are called with the recorded arguments and
``training=False``, so inside :meth:`KerasBackend.mc_mode` (dropout layers patched to ``training=True``) the
suffix is stochastic and outside it is the deterministic inference pass. Nothing in the user's model is
modified (no new nodes are created, unlike ``keras.Model(intermediate_tensors, outputs)``).

Nested Functional/Sequential models that contain dropout are *inlined* (their own graph is executed step by
step, so a deterministic backbone inside a nested model is cached too); nested models without dropout and
other layers run as one opaque step; a subclassed layer or model that holds a dropout layer is stochastic as a
whole.

Usage (what the backend / a "prefix" strategy calls)::

    split, reason = prefix_split(model, x)      # cached per model; None + reason -> use another strategy
    frontier = split.prefix(x)                  # list[tf.Tensor], each with N rows
    with backend.mc_mode(model), backend.seeded(model, seed):
        rows = [backend.repeat(f, k) for f in frontier]
        out = split.suffix(rows)                # (k * N, *out): sample j is out[j * N:(j + 1) * N]

**bf16.** :func:`bf16_clone` builds a copy of a Functional/Sequential model under the ``"mixed_bfloat16"``
dtype policy (weights copied, global policy restored), cached per model.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import tree

__all__ = [
    "DROPOUT_TYPES",
    "KerasSplit",
    "Unsplittable",
    "bf16_clone",
    "forget_bf16",
    "prefix_split",
    "split_model",
]

#: Dropout-family layers (SpatialDropout1D/2D/3D subclass ``keras.layers.Dropout``). Same set as the backend's.
DROPOUT_TYPES: tuple[type, ...] = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout)

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


def _holds_dropout(op: Any, dropout_types: tuple[type, ...]) -> bool:
    if isinstance(op, dropout_types):
        return True
    flatten = getattr(op, "_flatten_layers", None)
    return flatten is not None and any(isinstance(layer, dropout_types) for layer in flatten(include_self=True))


# --------------------------------------------------------------------------------------------------------------
# The program: the graph flattened into steps that read and write keyed values
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    run: Callable[[list], list]
    reads: tuple[_Key, ...]
    writes: tuple[_Key, ...]
    source: bool  # a dropout-family layer, or an opaque layer holding one
    compute: bool  # False for bookkeeping (entering / leaving an inlined model)
    op: Any
    label: str


def _call_step(node: Any, scope: tuple, dropout_types: tuple[type, ...]) -> _Step:
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
        source=_holds_dropout(op, dropout_types), compute=True, op=op, label=op.name,
    )


def _inlinable(node: Any, dropout_types: tuple[type, ...]) -> Any:
    """The graph of a nested Functional/Sequential model worth inlining at ``node``, else None."""
    op = node.operation
    if not isinstance(op, keras.Model) or not _holds_dropout(op, dropout_types) or "call" in op.__dict__:
        return None
    try:
        graph = _graph_of(op)
    except Unsplittable:
        return None
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if len(args) != 1 or any(k not in ("training", "mask") for k in kwargs) or kwargs.get("mask") is not None:
        return None
    return graph


def _emit(graph: Any, scope: tuple, dropout_types: tuple[type, ...], steps: list[_Step], known: set) -> None:
    """Append the steps of ``graph`` (its inputs already written under ``scope``) in Keras' execution order."""
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any((scope, id(t)) not in known for t in node.input_tensors):
                continue  # as Keras: not computable from the given inputs
            inner = _inlinable(node, dropout_types)
            if inner is None:
                step = _call_step(node, scope, dropout_types)
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
            _emit(inner, inner_scope, dropout_types, steps, known)
            steps.append(_Step(
                lambda values: list(values), tuple((inner_scope, id(t)) for t in inner.outputs),
                tuple((scope, id(t)) for t in node.outputs), source=False, compute=False, op=nested,
                label=f"leave {nested.name}",
            ))
            known.update(steps[-1].writes)


def _symbols(graph: Any, scope: tuple, dropout_types: tuple[type, ...], table: dict) -> None:
    """Map every key of the (inlined) program to its KerasTensor, for shapes and tests."""
    for t in graph.inputs:
        table[(scope, id(t))] = t
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            for t in node.outputs:
                table[(scope, id(t))] = t
            inner = _inlinable(node, dropout_types) if node.operation and not node.is_input else None
            if inner is not None:
                _symbols(inner, scope + (id(node),), dropout_types, table)


# --------------------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------------------

def _dropout_patch_state(layers: Sequence[Any]) -> tuple[bool, ...]:
    return tuple("call" in layer.__dict__ for layer in layers)


@contextlib.contextmanager
def _dropout_inactive(layers: Sequence[Any]) -> Iterator[None]:
    """Temporarily remove instance-level ``call`` overrides (the backend's mc_mode patch) from ``layers``."""
    hidden = [(layer, layer.__dict__.pop("call")) for layer in layers if "call" in layer.__dict__]
    try:
        yield
    finally:
        for layer, call in hidden:
            layer.call = call


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

    def __init__(self, model: Any, dropout_types: tuple[type, ...] = DROPOUT_TYPES) -> None:
        graph = _graph_of(model)
        self._model = weakref.ref(model)
        self._graph = None if graph is model else graph  # never hold the model itself strongly
        steps: list[_Step] = []
        self._input_keys = [((), id(t)) for t in graph.inputs]
        _emit(graph, (), dropout_types, steps, set(self._input_keys))
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
            raise Unsplittable("no dropout-family layer in the model's graph: nothing is stochastic")
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
        _symbols(graph, (), dropout_types, table)
        self.frontier_tensors = [table[key] for key in self._frontier]
        self.n_prefix_ops = sum(step.compute for step in prefix)
        self.n_suffix_ops = sum(step.compute for step in suffix)
        seen: dict[int, Any] = {}
        for step in suffix:
            for layer in getattr(step.op, "_flatten_layers", lambda **_: [])(include_self=True):
                if isinstance(layer, dropout_types):
                    seen.setdefault(id(layer), layer)
        self.dropout_layers = list(seen.values())
        self._prefix_fn = tf.function(self._run_prefix, reduce_retracing=True)
        self._suffix_fns: dict[tuple[bool, ...], Callable] = {}
        self._validated: dict[Hashable, str | None] = {}
        self._lock = threading.Lock()

    # -- description ------------------------------------------------------------------------------------------
    def describe(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.frontier_tensors)
        first = next(step.label for step in self._suffix_steps if step.compute)
        return (
            f"prefix of {self.n_prefix_ops} ops cached, suffix of {self.n_suffix_ops} ops from {first!r} repeated; "
            f"frontier: {len(self._frontier)} tensor(s) {shapes}"
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
        with _as_model_call(model):
            env = dict(zip(self._input_keys, _standardize(model, model if self._graph is None else self._graph, x)))
            self._run(self._prefix_steps, env)
        return [env[key] for key in self._frontier]

    def _run_suffix(self, frontier: list) -> Any:
        model = self._model_or_raise()
        with _as_model_call(model):
            env = dict(zip(self._frontier, frontier))
            self._run(self._suffix_steps, env)
        outputs = tree.pack_sequence_as(self._outputs_struct, [env[key] for key in self._output_keys])
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    def prefix(self, x: Any) -> list[tf.Tensor]:
        """The frontier for inputs ``x`` (the model's input structure, ``N`` rows): deterministic, inference mode.

        Shape:
            x: ``(N, *input_shape)`` -> a list of ``(N, *frontier_shape_i)`` tensors.
        """
        return list(self._prefix_fn(x))

    def suffix(self, frontier: Sequence[tf.Tensor]) -> Any:
        """Run the stochastic part on frontier tensors of ``k * N`` rows (``k`` stacked copies of :meth:`prefix`).

        Inside the backend's ``mc_mode`` the dropout layers are stochastic; outside it this is the inference
        pass. One ``tf.function`` is kept per patch state of the dropout layers, so a trace made in one mode is
        never reused in the other.

        Shape:
            frontier: list of ``(k * N, *frontier_shape_i)`` -> ``(k * N, *output_shape)`` (the model's output
            structure).
        """
        state = _dropout_patch_state(self.dropout_layers)
        function = self._suffix_fns.get(state)
        if function is None:
            with self._lock:
                function = self._suffix_fns.setdefault(
                    state, tf.function(self._run_suffix, reduce_retracing=True)
                )
        return function(list(frontier))

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self, x: Any, copies: int = 2) -> str | None:
        """Check the split on ``x``: ``None`` if it reproduces the model, else the reason it does not.

        Runs ``model(x, training=False)`` and ``suffix(copies × prefix(x))`` with every dropout layer inactive
        (also inside ``mc_mode``: its patches are lifted for the check) and compares each copy with the model's
        output (rtol 1e-4 in fp32, 2e-2 in 16-bit). Catches operations in the suffix that depend on the batch
        size. Cached per input shapes and dtypes; the seed state is untouched (inactive dropout draws nothing).
        """
        flat = [tf.convert_to_tensor(t) for t in tree.flatten(x)]
        signature = tuple((tuple(t.shape), t.dtype.name) for t in flat) + (copies,)
        if signature in self._validated:
            return self._validated[signature]
        model = self._model_or_raise()
        n = int(flat[0].shape[0])
        try:
            with _dropout_inactive(self.dropout_layers):
                reference = [_host(t) for t in tree.flatten(model(x, training=False))]
                frontier = self.prefix(x)
                bad = [tuple(f.shape) for f in frontier if len(f.shape) == 0 or int(f.shape[0]) != n]
                if bad:
                    raise Unsplittable(f"frontier tensors without the batch axis of {n} rows: {bad}")
                out = self.suffix([tf.tile(f, [copies] + [1] * (len(f.shape) - 1)) for f in frontier])
            reason = None
            for (ref, tol), (val, _) in zip(reference, [_host(t) for t in tree.flatten(out)]):
                if val.shape != (copies * ref.shape[0],) + ref.shape[1:]:
                    reason = f"suffix output shape {val.shape} != {copies} copies of {ref.shape}"
                    break
                diff = np.abs(val.reshape((copies,) + ref.shape) - ref[None]) / (np.abs(ref[None]) + 1.0)
                err = float(np.max(diff)) if diff.size else 0.0
                if not np.isfinite(err) or err > tol:
                    reason = f"split output differs from the full pass by {err:.3g} (> {tol:g}): batch-dependent op?"
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


def split_model(model: Any, dropout_types: tuple[type, ...] = DROPOUT_TYPES) -> tuple[KerasSplit | None, str]:
    """Cut ``model`` at its dropout layers (structure only, no validation); cached per model.

    Returns:
        ``(split, description)`` or ``(None, reason)`` — None for a subclassed model (no graph), an unbuilt
        Sequential, a model whose every input goes straight into a dropout (empty prefix: nothing to cache,
        use the vectorized strategy) or one with no dropout in its graph.
    """
    with _SPLITS_LOCK:
        entry = _SPLITS.get(model)
        if entry is None or entry["types"] != dropout_types:
            try:
                split: KerasSplit | None = KerasSplit(model, dropout_types)
                reason = split.describe()
            except Unsplittable as exc:
                split, reason = None, str(exc)
            entry = {"types": dropout_types, "split": split, "reason": reason}
            try:
                _SPLITS[model] = entry
            except TypeError:  # not weak-referenceable: do not cache
                pass
    return entry["split"], entry["reason"]


def prefix_split(model: Any, x: Any, dropout_types: tuple[type, ...] = DROPOUT_TYPES) -> tuple[KerasSplit | None, str]:
    """:func:`split_model` then :meth:`KerasSplit.validate` on ``x``: the one call a strategy needs.

    Safe inside or outside ``mc_mode`` and ``seeded`` (validation lifts the dropout patches and draws no
    random numbers). Returns ``(split, description)`` or ``(None, reason)``.
    """
    split, reason = split_model(model, dropout_types)
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
