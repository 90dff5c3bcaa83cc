"""Low-precision copies of Keras models: :func:`precision_clone` builds a copy of a Functional/Sequential
model under a mixed dtype policy (``"mixed_bfloat16"``; weights copied, the global policy restored), cached
per model.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator

import keras

from mcu.backends.keras.graph import graph_of

__all__ = ["bf16_clone", "precision_clone"]

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
    graph_of(model)  # Functional or Sequential only (clone_model would rebuild a subclassed one from config)
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
    call, so a model trained further since the last call is never sampled stale. Outputs are low precision; dropout seed states are the copy's own (seed them
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

