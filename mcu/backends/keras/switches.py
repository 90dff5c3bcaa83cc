"""MC mode for Keras 3 without touching the model: context-local switches read by hooks installed once.

**Sites.** The layers sampling switches on (:func:`find_sites`): ``Dropout`` (and ``SpatialDropout1D/2D/3D``),
``GaussianDropout`` and ``AlphaDropout`` with ``rate > 0``, RNN layers (``LSTM``, ``GRU``, ``SimpleRNN``,
``ConvLSTM*``, ``RNN(cell)``, also inside ``Bidirectional``) whose cells have ``dropout`` or
``recurrent_dropout > 0``, and ``Attention`` / ``AdditiveAttention`` with ``dropout > 0``. A
``MultiHeadAttention(dropout=)`` holds a ``Dropout`` sub-layer, which is a site itself. Everything else runs
as in inference: BatchNormalization uses its moving statistics, augmentation layers and ``GaussianNoise``
(additive noise, a form of augmentation) stay inactive, and so does a custom layer's own use of ``training``
(a custom layer that calls a ``Dropout`` sub-layer gets that dropout on, whatever ``training`` it passes).
Rate-0 layers are not sites (identities).

**Switches.** A pass runs inside :func:`active`, which sets a :class:`contextvars.ContextVar` (so it is local
to the thread, or the asyncio task, running the pass) and a ``keras.StatelessScope``:

- one wrapper around ``keras.layers.Layer.__call__`` (installed once, at import) calls the pass's sites with
  ``training=True``; outside a pass it only reads the context variable and calls through;
- the ``StatelessScope`` maps every seed generator of the model to a seed derived from the pass's key (a
  tensor argument of the traced function, so seeds never retrace) and collects every variable update of the
  pass instead of applying it: the model's weights, moving statistics and seed-generator states are never
  written, and the random draws of a seeded call do not depend on what other threads do;
- wrappers around the RNN cells' dropout-mask cache (``DropoutRNNCell``) keep the pass's masks in the pass's
  context instead of on the shared cell.

Keras resolves ``training`` in Python, so a traced function bakes the switches in when it is traced: the
backend's functions are traced inside :func:`active` and never reused outside it; anything traced outside
(the user's own ``model.predict``) never sees them. :func:`metering` counts leaf-layer output bytes of a
traced pass through the same wrapper.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import keras
import numpy as np

from mcu.errors import DropoutSiteWarning

__all__ = [
    "DROPOUT_TYPES",
    "Session",
    "Sites",
    "active",
    "find_sites",
    "in_pass",
    "install",
    "metering",
    "metering_now",
    "record",
    "seed_values",
    "session",
    "using_session",
]

#: Dropout-family layers (SpatialDropout1D/2D/3D subclass ``keras.layers.Dropout``).
DROPOUT_TYPES: tuple[type, ...] = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout)
_ATTENTION_TYPES: tuple[type, ...] = (keras.layers.Attention, keras.layers.AdditiveAttention)


# --------------------------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------------------------

def _all_layers(model: Any) -> list[Any]:
    return list(model._flatten_layers(include_self=True, recursive=True))


def _cells(cell: Any) -> list[Any]:
    inner = getattr(cell, "cells", None)  # StackedRNNCells
    return [c for sub in inner for c in _cells(sub)] if isinstance(inner, (list, tuple)) else [cell]


def _rate(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def site_config(layer: Any) -> tuple | None:
    """What makes ``layer`` a dropout site (its rates, noise shape), or None when it is not one."""
    if isinstance(layer, DROPOUT_TYPES):
        rate = _rate(getattr(layer, "rate", 0))
        return ("rate", rate, getattr(layer, "noise_shape", None)) if rate > 0 else None
    if isinstance(layer, keras.layers.RNN):
        rates = tuple((_rate(getattr(c, "dropout", 0)), _rate(getattr(c, "recurrent_dropout", 0)))
                      for c in _cells(layer.cell))
        return ("rnn", rates) if any(a > 0 or b > 0 for a, b in rates) else None
    if isinstance(layer, _ATTENTION_TYPES):
        rate = _rate(getattr(layer, "dropout", 0))
        return ("attention", rate) if rate > 0 else None
    return None


def configured_dropout(layer: Any) -> bool:
    """Whether ``layer`` is of a dropout-carrying kind at all (any rate): for the rate-0 message."""
    return isinstance(layer, DROPOUT_TYPES + _ATTENTION_TYPES + (keras.layers.RNN,))


@dataclass(frozen=True)
class Sites:
    """The dropout sites of one model and every seed generator reachable from it."""

    layers: tuple[Any, ...]
    ids: frozenset[int]
    generators: tuple[Any, ...]
    signature: tuple  # rates and ids: a traced pass is valid while this is unchanged
    unknown_random: tuple[Any, ...]  # custom layers that draw random numbers but are not sites

    def without_layers(self) -> "Sites":
        """The same switches without references to the layers (for closures cached beside the model)."""
        return Sites((), self.ids, self.generators, self.signature, ())

    def names(self, ids: Sequence[int] | set[int]) -> list[str]:
        return [f"{layer.name} ({type(layer).__name__})" for layer in self.layers if id(layer) in ids]


def find_sites(model: Any) -> Sites:
    """The dropout sites of ``model`` (nested models and layers held by subclassed models included)."""
    layers, generators, signature, unknown = [], [], [], []
    seen: set[int] = set()
    for layer in _all_layers(model):
        for generator in getattr(layer, "_seed_generators", ()) or ():
            if id(generator) not in seen:
                seen.add(id(generator))
                generators.append(generator)
        config = site_config(layer)
        if config is not None:
            layers.append(layer)
            signature.append((id(layer), config))
        elif (getattr(layer, "_seed_generators", None) and "training" in getattr(layer, "_call_context_args", ())
              and not type(layer).__module__.startswith("keras.")):
            unknown.append(layer)
    signature.append(tuple(id(g) for g in generators))
    return Sites(tuple(layers), frozenset(id(layer) for layer in layers), tuple(generators), tuple(signature),
                 tuple(unknown))


def check_reached(layers: Sequence[Any], reached: set[int], ran: str) -> None:
    """After tracing a pass: every site in ``layers`` ran switched on, or the user hears about it (no silent
    zero): a warning naming the sites that did not, :class:`~mcu.errors.NoDropoutError` when none did."""
    from mcu.errors import NoDropoutError

    missing = [f"{layer.name} ({type(layer).__name__})" for layer in layers if id(layer) not in reached]
    if not missing:
        return
    if len(missing) == len(layers):
        raise NoDropoutError(
            f"model: its dropout site(s) {missing} never ran during {ran}, so every MC sample would be "
            "identical; expected the model's call to call them (a layer counts when it is called, as layer(x), "
            "during the forward pass)."
        )
    warnings.warn(
        f"mcu: dropout site(s) {missing} did not run during {ran}: they add no randomness to the samples (a "
        "layer counts when it is called, as layer(x), during the forward pass).",
        DropoutSiteWarning, stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------------------
# The context of a pass
# --------------------------------------------------------------------------------------------------------------

@dataclass
class _State:
    force: frozenset[int] = frozenset()  # ids of the layers called with training=True
    sites: frozenset[int] = frozenset()
    reached: set[int] | None = None  # ids of the sites called during the pass (trace)
    masks: dict = field(default_factory=dict)  # the pass's RNN dropout masks, by (id(cell), kind)
    meter: list[int] | None = None
    measure: Callable[[Any], int] | None = None  # bytes of a recorded tensor (0: not counted)


_STATE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("mcu_keras_pass", default=None)


def seed_values(key: Any, count: int) -> np.ndarray:
    """``(count, 2)`` int64 seed-generator states in ``[0, 2**31)`` from a pass key (an int or a ``(1,)`` uint64
    array) with numpy: the seeds of a pass for Keras on JAX or PyTorch (:func:`.keys.seed_values` on TensorFlow)."""
    key = int(np.asarray(key).reshape(-1)[0])
    words = np.random.SeedSequence([key & 0xFFFFFFFF, key >> 32]).generate_state(2 * count, np.uint32)
    return (words & np.uint32(0x7FFFFFFF)).astype(np.int64).reshape(count, 2)


@contextlib.contextmanager
def active(sites: Sites, seeds: Any, *, force: bool = True,
           reached: set[int] | None = None, reads: Sequence[tuple[Any, Any]] = ()) -> Iterator[None]:
    """Run the enclosed Keras calls as an MC pass: ``sites`` with ``training=True`` (``force``), every seed
    generator of the model seeded from ``seeds`` (``(len(sites.generators), 2)`` states derived from the pass
    key: :func:`seed_values`, or a tensor of :func:`.keys.seed_values` on TensorFlow; None: their current
    states), no variable written. ``reached`` collects the ids of the sites that were called.
    ``reads``: ``(variable, value)`` pairs the pass reads instead of the variables (a compiled function's
    arguments); ``seeds`` take precedence."""
    outer = _STATE.get()
    state = _State(force=sites.ids if force else frozenset(), sites=sites.ids, reached=reached,
                   meter=None if outer is None else outer.meter, measure=None if outer is None else outer.measure)
    mapping = list(reads)
    if seeds is not None and sites.generators:
        mapping += [(g.state, seeds[i]) for i, g in enumerate(sites.generators)]
    token = _STATE.set(state)
    try:
        with keras.StatelessScope(state_mapping=mapping, initialize_variables=False):
            yield
    finally:
        _STATE.reset(token)


@contextlib.contextmanager
def metering(measure: Callable[[Any], int]) -> Iterator[list[int]]:
    """Count the bytes (``measure(t)``) of every leaf-layer output (and of :func:`record`-ed tensors) of the
    enclosed calls, in this context only; yields ``[bytes]``. The backend's traced functions run their Python
    meanwhile (:func:`metering_now`), so the layers are seen with static shapes."""
    meter = [0]
    outer = _STATE.get()
    state = _State() if outer is None else _State(outer.force, outer.sites, outer.reached, outer.masks)
    state.meter, state.measure = meter, measure
    token = _STATE.set(state)
    try:
        yield meter
    finally:
        _STATE.reset(token)


def in_pass() -> bool:
    """Whether the caller runs inside an MC pass (:func:`active`) in this context."""
    return _STATE.get() is not None


def metering_now() -> bool:
    state = _STATE.get()
    return state is not None and state.meter is not None


def record(t: Any) -> Any:
    """Add ``t``'s bytes to the active meter (if any; its ``measure`` decides what counts); returns ``t``."""
    state = _STATE.get()
    if state is not None and state.meter is not None:
        state.meter[0] += state.measure(t)
    return t


# --------------------------------------------------------------------------------------------------------------
# Sessions: the mode and the key stream of the sampling calls running in this context, per model
# --------------------------------------------------------------------------------------------------------------

class KeyStream:
    """Per-pass keys of a session: pass ``i`` gets ``splitmix64(base + i)`` (distinct for distinct ``i``);
    ``base`` from ``np.random.SeedSequence(seed)`` (fresh entropy without a seed). The TensorFlow path hands
    them out as tensors (:class:`.keys.TensorKeyStream`)."""

    def __init__(self, seed: int | None) -> None:
        words = np.random.SeedSequence(seed).generate_state(2, np.uint32)
        self._base = (int(words[0]) << 32) | int(words[1])
        self._next = 0
        self._lock = threading.Lock()

    def _keys(self, n: int) -> np.ndarray:
        from mcu import _seeds

        start, self._next = self._next, self._next + n
        return _seeds.sample_keys([self._base + start + i for i in range(n)])

    def take(self, n: int = 1) -> np.ndarray:
        """The next ``n`` keys, ``(n,)`` uint64."""
        with self._lock:
            return self._keys(n)


@dataclass(frozen=True)
class Session:
    mode: str | None
    sites: Sites | None
    stream: KeyStream


_SESSIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mcu_keras_sessions", default=None)


def session(model: Any) -> Session | None:
    """The sampling session of ``model`` open in this context (thread or asyncio task), if any."""
    return (_SESSIONS.get() or {}).get(id(model))


@contextlib.contextmanager
def using_session(model: Any, value: Session) -> Iterator[None]:
    sessions = dict(_SESSIONS.get() or {})
    sessions[id(model)] = value
    token = _SESSIONS.set(sessions)
    try:
        yield
    finally:
        _SESSIONS.reset(token)


# --------------------------------------------------------------------------------------------------------------
# The hooks (installed once)
# --------------------------------------------------------------------------------------------------------------

_INSTALL_LOCK = threading.Lock()
_ORIGINAL: dict[str, Callable] = {}
_TRAINING_INDEX: "weakref.WeakKeyDictionary[type, int | None]" = weakref.WeakKeyDictionary()


def _training_index(layer: Any) -> int | None:
    """The position of ``training`` among the positional parameters of ``layer.call`` (None: keyword only)."""
    cls = type(layer)
    if cls not in _TRAINING_INDEX:
        index = None
        for i, parameter in enumerate(layer._call_signature.parameters.values()):
            if parameter.name == "training":
                index = i if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD) else None
                break
        _TRAINING_INDEX[cls] = index
    return _TRAINING_INDEX[cls]


def _is_leaf(layer: Any) -> bool:
    return next(iter(layer._flatten_layers(include_self=False, recursive=False)), None) is None


def _layer_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    state = _STATE.get()
    if state is None:
        return _ORIGINAL["__call__"](self, *args, **kwargs)
    if id(self) in state.sites:
        if state.reached is not None:
            state.reached.add(id(self))
        if id(self) in state.force:
            index = _training_index(self)
            if index is not None and len(args) > index:
                args = args[:index] + (True,) + args[index + 1:]
            else:
                kwargs["training"] = True
    out = _ORIGINAL["__call__"](self, *args, **kwargs)
    if state.meter is not None and _is_leaf(self):
        for t in keras.tree.flatten(out):
            record(t)
    return out


def _mask_getter(kind: str, rate: str, name: str) -> Callable:
    def get_mask(self: Any, step_input: Any) -> Any:
        state = _STATE.get()
        if state is None:
            return _ORIGINAL[name](self, step_input)
        key = (id(self), kind)
        if state.masks.get(key) is None and getattr(self, rate) > 0:
            state.masks[key] = self._create_dropout_mask(step_input, getattr(self, rate))
        return state.masks.get(key)

    return get_mask


def _mask_reset(kind: str, name: str) -> Callable:
    def reset_mask(self: Any) -> None:
        state = _STATE.get()
        if state is None:
            return _ORIGINAL[name](self)
        state.masks.pop((id(self), kind), None)

    return reset_mask


def install() -> None:
    """Install the hooks (idempotent). Outside a pass they call straight through."""
    from keras.src.layers.layer import Layer
    from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell

    with _INSTALL_LOCK:
        if _ORIGINAL:
            return
        _ORIGINAL["__call__"] = Layer.__call__
        for name in ("get_dropout_mask", "get_recurrent_dropout_mask", "reset_dropout_mask",
                     "reset_recurrent_dropout_mask"):
            _ORIGINAL[name] = getattr(DropoutRNNCell, name)
        wrapped = _ORIGINAL["__call__"]
        _layer_call.__wrapped__ = wrapped  # type: ignore[attr-defined]
        _layer_call.__doc__ = wrapped.__doc__
        DropoutRNNCell.get_dropout_mask = _mask_getter("input", "dropout", "get_dropout_mask")
        DropoutRNNCell.get_recurrent_dropout_mask = _mask_getter("recurrent", "recurrent_dropout",
                                                                 "get_recurrent_dropout_mask")
        DropoutRNNCell.reset_dropout_mask = _mask_reset("input", "reset_dropout_mask")
        DropoutRNNCell.reset_recurrent_dropout_mask = _mask_reset("recurrent", "reset_recurrent_dropout_mask")
        Layer.__call__ = _layer_call


install()
