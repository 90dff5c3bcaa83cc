"""The Keras functional graph as a program: the Keras internals mcu relies on, in one place, and the graph
flattened into steps that read and write keyed values (:class:`Step`), with nested Functional/Sequential models
that hold dropout inlined. :mod:`.split` cuts this program at the dropout sites.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import keras
from keras import tree

__all__ = ["Key", "Step", "Unsplittable", "as_model_call", "emit", "graph_of", "standardize", "symbols"]

Key = tuple  # (scope, id(KerasTensor)): scope tells apart the calls of an inlined nested model


class Unsplittable(Exception):
    """The model has no usable deterministic prefix; ``str(exc)`` says why (used as the reason string)."""


# --------------------------------------------------------------------------------------------------------------
# Keras internals we rely on, in one place
# --------------------------------------------------------------------------------------------------------------

def graph_of(model: Any) -> Any:
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


def standardize(model: Any, graph: Any, inputs: Any) -> list:
    """What ``model.__call__`` does to its inputs before running the graph (dtype conversion, rank fix)."""
    if getattr(model, "_convert_input_args", False):  # Layer.__call__ step 1 (Sequential; Functional opts out)
        policy, autocast, dtype = model.dtype_policy, model.autocast, model.input_dtype
        inputs = tree.map_structure(lambda t: policy.convert_input(t, autocast, dtype), inputs)
    return list(graph._standardize_inputs(inputs))


@contextlib.contextmanager
def as_model_call(model: Any) -> Iterator[None]:
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


def holds_site(op: Any, sites: frozenset[int]) -> bool:
    """Whether ``op`` is a dropout site (:mod:`.switches`) or holds one."""
    if id(op) in sites:
        return True
    flatten = getattr(op, "_flatten_layers", None)
    return flatten is not None and any(id(layer) in sites for layer in flatten(include_self=True))


# --------------------------------------------------------------------------------------------------------------
# The program: the graph flattened into steps that read and write keyed values
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    run: Callable[[list], list]
    reads: tuple[Key, ...]
    writes: tuple[Key, ...]
    source: bool  # a dropout site, or an opaque layer holding one
    compute: bool  # False for bookkeeping (entering / leaving an inlined model)
    op: Any
    label: str
    node: Any = None  # the graph node of a plain layer call (None for bookkeeping steps)


def call_step(node: Any, scope: tuple, sites: frozenset[int]) -> Step:
    op = node.operation
    inputs = list(node.input_tensors)
    inject_training = "training" in getattr(op, "_call_context_args", ())

    def run(values: list) -> list:
        args, kwargs = node.arguments.fill_in({id(kt): v for kt, v in zip(inputs, values)})
        if inject_training:  # as Functional.call's operation_fn does with the model's training=False
            kwargs["training"] = False
        return tree.flatten(op(*args, **kwargs))

    return Step(
        run, tuple((scope, id(t)) for t in inputs), tuple((scope, id(t)) for t in node.outputs),
        source=holds_site(op, sites), compute=True, op=op, label=op.name, node=node,
    )


def inlinable(node: Any, sites: frozenset[int]) -> Any:
    """The graph of a nested Functional/Sequential model worth inlining at ``node``, else None."""
    op = node.operation
    if not isinstance(op, keras.Model) or not holds_site(op, sites) or "call" in op.__dict__:
        return None
    try:
        graph = graph_of(op)
    except Unsplittable:
        return None
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if len(args) != 1 or any(k not in ("training", "mask") for k in kwargs) or kwargs.get("mask") is not None:
        return None
    return graph


def emit(graph: Any, scope: tuple, sites: frozenset[int], steps: list[Step], known: set) -> None:
    """Append the steps of ``graph`` (its inputs already written under ``scope``) in Keras' execution order."""
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any((scope, id(t)) not in known for t in node.input_tensors):
                continue  # as Keras: not computable from the given inputs
            inner = inlinable(node, sites)
            if inner is None:
                step = call_step(node, scope, sites)
                steps.append(step)
                known.update(step.writes)
                continue
            nested, inner_scope = node.operation, scope + (id(node),)
            inputs = list(node.input_tensors)

            def enter(values: list, node=node, inputs=inputs, nested=nested, inner=inner) -> list:
                args, _ = node.arguments.fill_in({id(kt): v for kt, v in zip(inputs, values)})
                return standardize(nested, inner, args[0])

            steps.append(Step(
                enter, tuple((scope, id(t)) for t in inputs), tuple((inner_scope, id(t)) for t in inner.inputs),
                source=False, compute=False, op=nested, label=f"enter {nested.name}",
            ))
            known.update(steps[-1].writes)
            emit(inner, inner_scope, sites, steps, known)
            steps.append(Step(
                lambda values: list(values), tuple((inner_scope, id(t)) for t in inner.outputs),
                tuple((scope, id(t)) for t in node.outputs), source=False, compute=False, op=nested,
                label=f"leave {nested.name}",
            ))
            known.update(steps[-1].writes)


def symbols(graph: Any, scope: tuple, sites: frozenset[int], table: dict) -> None:
    """Map every key of the (inlined) program to its KerasTensor, for shapes and tests."""
    for t in graph.inputs:
        table[(scope, id(t))] = t
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            for t in node.outputs:
                table[(scope, id(t))] = t
            inner = inlinable(node, sites) if node.operation and not node.is_input else None
            if inner is not None:
                symbols(inner, scope + (id(node),), sites, table)
