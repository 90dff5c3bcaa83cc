"""What the Keras backend does the same on every framework Keras runs on, without importing any of them.

:class:`BaseKerasBackend` holds the shared logic: the dropout sites and their checks (:mod:`.switches`), the
sampling sessions and their seeds (switched on in this context only, nothing on the model changed, so nothing
to restore), structured inputs, the classification of a failing pass, the weights' bytes. Its subclasses run
the passes: :class:`.backend.KerasBackend` on TensorFlow (traced functions and the fast paths),
:class:`.portable.PortableKerasBackend` on JAX or PyTorch (full passes); each imports its framework.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from typing import Any, Iterator

import keras

from mcu.backends.keras import memory as _memory
from mcu.backends.keras import switches as _switches
from mcu.errors import DropoutSiteWarning, InputError, MCUError, NoDropoutError
from mcu.structured import Batch

__all__ = ["STRUCTURED_SPLIT", "BaseKerasBackend"]

_SITE_NAMES = ("Dropout, SpatialDropout1D/2D/3D, GaussianDropout, AlphaDropout (rate > 0), an RNN layer with "
               "dropout or recurrent_dropout > 0, or an attention layer with dropout > 0")
#: Why a model with structured inputs has no prefix split
STRUCTURED_SPLIT = "the model takes structured inputs; prefix caching supports one input tensor"


def _raised_by(exc: BaseException, dirs: tuple[str, ...]) -> bool:
    """Whether the innermost Python frame of ``exc`` lies in ``dirs`` (a layer refused its inputs), not in the
    model's own code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_filename.startswith(dirs)


class BaseKerasBackend:
    """MC dropout for Keras 3 models (Sequential, Functional, subclassed, nested): the part that does not depend
    on the framework Keras runs on. Subclasses implement the passes (``_run``) and the tensor conversions."""

    name = "tensorflow"
    dropout_types = _switches.DROPOUT_TYPES
    #: Makes a session's per-pass keys (:class:`.switches.KeyStream` or a subclass)
    key_stream: type = _switches.KeyStream
    #: Exceptions that mean "the layer refused its inputs" when raised in :attr:`framework_dirs`
    input_errors: tuple[type, ...] = (ValueError, TypeError)
    #: Frames of these packages (mcu's backend hooks included): an exception raised there is a layer refusing
    #: its input
    framework_dirs: tuple[str, ...] = (os.path.dirname(keras.__file__), os.path.dirname(__file__))

    def __init__(self) -> None:
        self._compiled: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
        self._warned: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def is_model(self, obj: Any) -> bool:
        return isinstance(obj, keras.layers.Layer)

    def sites(self, model: keras.layers.Layer) -> _switches.Sites:
        """The dropout sites of ``model`` (see :mod:`.switches`); raises :class:`NoDropoutError` if none."""
        sites = _switches.find_sites(model)
        if not sites.layers:
            zero = [layer.name for layer in model._flatten_layers(include_self=True, recursive=True)
                    if _switches.configured_dropout(layer)]
            if zero:
                raise NoDropoutError(
                    f"model: {type(model).__qualname__}'s dropout layer(s) {zero} all have rate 0, so every MC "
                    "sample would be identical; expected at least one dropout site with a rate > 0."
                )
            raise NoDropoutError(
                f"model: {type(model).__qualname__} has no dropout layer, so every MC sample would be "
                f"identical; expected at least one of keras.layers.{_SITE_NAMES}."
            )
        if sites.unknown_random and self._warned.get(model) != sites.signature:
            self._warned[model] = sites.signature
            warnings.warn(
                f"mcu: layer(s) {[f'{layer.name} ({type(layer).__name__})' for layer in sites.unknown_random]} take "
                "`training` and own a random seed generator but are not dropout layers mcu knows: they run with "
                "training=False while sampling (no randomness from them). If they implement dropout, build them "
                "from keras.layers.Dropout.",
                DropoutSiteWarning, stacklevel=4,
            )
        return sites

    def dropout_layers(self, model: keras.layers.Layer) -> list[keras.layers.Layer]:
        """Every dropout site of ``model`` (rate > 0); raises :class:`NoDropoutError` if none."""
        return list(self.sites(model).layers)

    def stacking_problem(self, model: keras.layers.Layer, split: Any = None) -> str | None:
        """Why stacked copies of the batch in one pass would not sample independently (None: they would): a
        ``Dropout`` with ``noise_shape[0] == 1`` draws one mask for the whole batch, so every stacked copy would
        get the same mask. Layers whose masks ``split`` draws per sample (its fast path) are fine."""
        fast = {id(layer) for layer in getattr(split, "fast_layers", [])}
        shared = [layer.name for layer in self.dropout_layers(model)
                  if getattr(layer, "noise_shape", None) is not None and len(layer.noise_shape) > 0
                  and layer.noise_shape[0] == 1 and id(layer) not in fast]
        if not shared:
            return None
        return (f"dropout layer(s) {shared} share one mask across the batch (noise_shape[0] == 1), so stacked "
                "copies of the batch would share it too")

    @contextlib.contextmanager
    def mc_mode(self, model: keras.layers.Layer, mode: str = "dropout", x: Any = None) -> Iterator[None]:
        """Open a sampling session for ``model`` in this context (thread or asyncio task): :meth:`forward` then
        runs MC passes. Nothing on the model is changed; nothing to restore. Yields None (the passes run on the
        model itself). ``x`` is accepted for the protocol and not needed here."""
        sites = self.sites(model)
        with _switches.using_session(model, _switches.Session(mode, sites, self.key_stream(None))):
            yield None

    @contextlib.contextmanager
    def seeded(self, model: keras.layers.Layer, seed: int | None) -> Iterator[None]:
        """Passes of :meth:`forward` inside the block draw from keys derived from ``seed`` (fresh entropy when
        None), in this context only; the model's seed generators are never read or written."""
        current = _switches.session(model)
        sites = current.sites if current is not None else self.sites(model)
        mode = current.mode if current is not None else None
        with _switches.using_session(model, _switches.Session(mode, sites, self.key_stream(seed))):
            yield

    def precision(self, model: keras.layers.Layer, precision: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the precision lives in the model (model_for_precision)

    def forward(self, model: keras.layers.Layer, x: Any) -> Any:
        """One MC pass: the model's raw output (a tensor or a structure; see :meth:`select_output`)."""
        if isinstance(x, Batch):
            x = x.as_input() if x.keys is not None else list(x.leaves)
        session = _switches.session(model)
        if session is None or session.mode is None:
            raise RuntimeError("KerasBackend.forward must run inside mc_mode()")
        return self._run(model, session, x)

    def _run(self, model: keras.layers.Layer, session: _switches.Session, x: Any) -> Any:
        """One MC pass of ``model`` on ``x`` in ``session`` (the subclass' framework)."""
        raise NotImplementedError

    def _model_error(self, model: Any, x: Any, exc: BaseException) -> MCUError:
        """The error for an exception of a forward pass: the input's fault (the model refused it) or the
        model's."""
        if isinstance(exc, MCUError):
            return exc
        first = keras.tree.flatten(x)[0]
        shape = keras.tree.map_structure(lambda t: tuple(t.shape[1:]), x)
        if isinstance(exc, self.input_errors) and _raised_by(exc, self.framework_dirs):
            dtype = getattr(first.dtype, "name", str(first.dtype))
            return InputError(f"x: the model rejected inputs of per-example shape {shape} and dtype {dtype} "
                              f"(a pass of {first.shape[0]} rows): {exc}")
        return InputError(f"model: {type(model).__qualname__} raised {type(exc).__name__} during a forward pass on "
                          f"x of per-example shape {shape}: {exc} (the original exception is the cause)")

    @contextlib.contextmanager
    def worker_threads(self, workers: int) -> Iterator[None]:
        """Nothing to divide (TensorFlow's intra-op thread pool is process-wide and fixed once it started)."""
        yield

    def worker_context(self, model: keras.layers.Layer, precision: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def weight_bytes(self, model: keras.layers.Layer) -> int:
        return _memory.weight_bytes(model)

    def free_bytes(self, model: keras.layers.Layer) -> int | None:
        return _memory.free_bytes()
