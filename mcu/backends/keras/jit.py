"""Keras on JAX (``KERAS_BACKEND=jax``): MC passes compiled with ``jax.jit``.

An eager Keras pass on JAX dispatches every operation on its own (a recurrent layer re-traces its scan on every
call), so the passes of :mod:`.portable` are compiled instead: one ``jax.jit`` function per model, mode,
per-example input shape and dtype, and dropout configuration (cached beside the model; JAX compiles it once per
batch size). The model's variables are arguments of the function, read on every call (never baked in, so
weights changed later are used), and the seed generators' states are arguments derived from the pass key
(:func:`.switches.seed_values`), so every pass draws new masks without retracing. The switches of
:func:`.switches.active` are Python decisions baked into the trace, as for the TensorFlow path's traced
functions; no variable is written (the pass runs in a ``keras.StatelessScope``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import jax
import keras
import numpy as np

from mcu.backends.keras import switches as _switches
from mcu.errors import InputError

__all__ = ["forward"]

_LOCK = threading.Lock()
_COMPILED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _signature(x: Any) -> str:
    return repr(keras.tree.map_structure(lambda t: (tuple(t.shape[1:]), str(t.dtype)), x))


def _compile(model: Any, session: _switches.Session) -> tuple[Callable, set[int]]:
    """``run(trainable, non_trainable, seeds, x)``: one MC pass of ``model`` reading its variables from the
    arguments; the set collecting the sites reached when it is traced."""
    ref, training, reached = weakref.ref(model), session.mode == "training", set()  # no strong reference
    sites = session.sites.without_layers()

    def body(trainable: list, non_trainable: list, seeds: Any, x: Any) -> Any:
        net = ref()
        reads = list(zip(net.trainable_variables, trainable)) + list(zip(net.non_trainable_variables, non_trainable))
        reads += [(g.state, seeds[i]) for i, g in enumerate(sites.generators)]  # after: the pass's seeds win
        with _switches.active(sites, None, force=not training, reached=reached, reads=reads):
            return net(x, training=training)

    return jax.jit(body), reached


def _entry(model: Any) -> dict:
    with _LOCK:
        return _COMPILED.setdefault(model, {"lock": threading.Lock(), "functions": {}})


def _values(model: Any, variables: list) -> list:
    """The variables' current values; a clear error when Keras detached them (it does so on JAX while
    ``model.fit`` / ``predict`` / ``evaluate`` runs, keeping the values in the running loop)."""
    detached = [v.path for v in variables if v._value is None]
    if detached:
        raise InputError(f"model: {type(model).__qualname__}'s variables {detached[:3]} hold no values right now: "
                         "Keras on JAX detaches them while model.fit/predict/evaluate runs (on another thread?); "
                         "expected a model not inside such a call (sample before or after it).")
    return [v.value for v in variables]


def forward(model: Any, x: Any, session: _switches.Session, key: np.ndarray, reached: set[int] | None) -> Any:
    """One compiled MC pass; ``reached`` (if given) receives the sites the trace called."""
    if not model.built:  # a model never called has no variables yet: they must exist outside the trace
        with _entry(model)["lock"], keras.StatelessScope():  # one discarded inference pass, nothing else written
            if not model.built:
                model(x, training=False)
    signature = (session.mode, _signature(x), session.sites.signature)
    entry = _entry(model)
    compiled = entry["functions"].get(signature)
    if compiled is None:
        with entry["lock"]:
            compiled = entry["functions"].get(signature)
            if compiled is None:
                compiled = entry["functions"][signature] = _compile(model, session)
    run, traced = compiled
    seeds = _switches.seed_values(key, len(session.sites.generators))
    out = run(_values(model, model.trainable_variables), _values(model, model.non_trainable_variables),
              seeds.astype(np.uint32), x)
    if reached is not None:
        reached |= traced
    return out
