"""The Keras 3 backend on TensorFlow: dropout sites run with ``training=True``, everything else in inference mode
(BatchNormalization uses its moving statistics, augmentation layers are inactive). The framework-free part
(sites, sessions, errors) is :class:`.base.BaseKerasBackend`; this module adds the TensorFlow passes and fast paths.

How: nothing on the model is changed. :mod:`.switches` decides the sites (dropout-family layers, RNN layers
with ``dropout``/``recurrent_dropout``, attention dropout; rate 0 is no site) and switches them on inside the
backend's traced functions only, through context-local state read by hooks installed once; every random draw
of a pass comes from a per-pass key (a tensor argument), and no variable is written (``keras.StatelessScope``).
So concurrent calls from threads or asyncio tasks, and plain inference on the same model, do not affect each
other, and a seeded call is reproducible whatever runs beside it. Forward passes run through concrete
functions cached per model, mode, per-example input shape and dtype, and dropout configuration.

Prefix/parallel strategies run a split of Functional/Sequential models (:mod:`.split`) in which
Dropout and SpatialDropout1D/2D/3D draw exact masks from one Philox stream per sample
(:meth:`KerasBackend.generators`), so a seeded result does not depend on how samples are grouped into passes
or threads; other sites (GaussianDropout, AlphaDropout, RNN and attention dropout, dropout inside a subclassed
layer) draw from the block's first key (:attr:`_SplitAdapter.native_rng`).
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record as _tape_record

from mcu.backends.keras import keys as _keys, masks as _masks, memory as _memory, precision as _precision
from mcu.backends.keras import split as _split, switches as _switches
from mcu.backends.keras.base import STRUCTURED_SPLIT, BaseKerasBackend
from mcu.errors import InputError, MCUError
from mcu.structured import Batch, is_structured, select_output

__all__ = ["KerasBackend"]

_POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def _native_fp16() -> bool:
    """A GPU, or a CPU with AVX512-FP16 / AMX-FP16 (read from /proc/cpuinfo where it exists)."""
    if tf.config.list_physical_devices("GPU"):
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_fp16" in flags or "amx_fp16" in flags


class _Frontier(list):
    """The frontier of ``rows`` examples as :meth:`_SplitAdapter.prefix` returns it (a list of tensors).

    The strategies pass it back unrepeated (``repeats_frontier``): the split stacks the copies itself,
    broadcasting the dropout masks against it instead of materialising ``k`` copies.
    """

    rows: int


class _SplitAdapter:
    """The strategies' split interface over a :class:`_split.KerasSplit`.

    ``suffix(frontier, generators)``: ``generators`` are per-sample Philox keys (:meth:`KerasBackend.generators`);
    sample ``j``'s fast dropout masks depend on its key alone, so blocks may be grouped in any way and run on
    parallel threads. ``native_rng`` is True when some site of the suffix has no fast path (GaussianDropout,
    AlphaDropout, RNN or attention dropout, a dropout inside a subclassed layer, ...): it draws from a seed
    derived from the block's first key, so the result then depends on the grouping (reproducible for a given
    grouping, also on threads).
    """

    repeats_frontier = True
    fused: tuple = ()  # no fused pairs: nothing for an unfused variant to leave out
    unfused = None

    def __init__(self, split: Any) -> None:
        self._split = split

    def row_block(self, frontier: list[tf.Tensor]) -> None:
        """No row blocks: the suffix runs all examples at once."""
        return None

    @staticmethod
    def rows(frontier: list[tf.Tensor], start: int, stop: int) -> list[tf.Tensor]:
        return [f[start:stop] for f in frontier]

    @property
    def native_rng(self) -> bool:
        return self._split.native_rng

    def prefix(self, x: tf.Tensor) -> list[tf.Tensor]:
        with _tape_record.stop_recording():
            frontier = _Frontier(self._split.prefix(x))
        frontier.rows = int(frontier[0].shape[0])
        return frontier

    def suffix(self, frontier: list[tf.Tensor], generators: Any) -> tf.Tensor:
        # the prefix's own list: N rows standing for len(generators) copies; anything else: stacked copies
        broadcast = isinstance(frontier, _Frontier) and int(frontier[0].shape[0]) == frontier.rows
        with _tape_record.stop_recording():
            return self._split.sample(list(frontier), generators, broadcast=broadcast)

    @property
    def description(self) -> str:
        return self._split.describe()

    @property
    def fast_layers(self) -> list[Any]:
        """The dropout layers whose masks the split draws itself, per sample."""
        return self._split.fast_layers


class KerasBackend(BaseKerasBackend):
    """MC dropout for Keras 3 models (Sequential, Functional, subclassed, nested) on TensorFlow."""

    key_stream = _keys.TensorKeyStream
    input_errors = (ValueError, TypeError, tf.errors.InvalidArgumentError)
    framework_dirs = BaseKerasBackend.framework_dirs + (os.path.dirname(tf.__file__),)

    def model_for_precision(self, model: keras.layers.Layer, precision: str) -> keras.layers.Layer:
        """The model itself for fp32; for bf16/fp16 a cached mixed-precision copy (weights synced from the
        model on every call; the user's model and the global dtype policy are untouched)."""
        if precision == "fp32":
            return model
        if precision == "fp16" and not _native_fp16():
            warnings.warn(
                "precision='fp16': this machine has no native float16 arithmetic (no GPU, no AVX512-FP16 CPU); "
                "fp16 is emulated and usually slower than fp32. Use precision='bf16' (or 'fp32') here.",
                RuntimeWarning,
                stacklevel=5,
            )
        with _tape_record.stop_recording():  # the copy's weights are synced from the model's
            clone = _precision.precision_clone(model, _POLICIES[precision])
        if clone is None:
            raise InputError(
                f"precision: {precision!r} on the tensorflow backend needs a Functional or Sequential Keras model "
                f"(it is run as a {_POLICIES[precision]} copy); {type(model).__qualname__} cannot be cloned. "
                "Expected precision='fp32', or build the model under keras.mixed_precision yourself."
            )
        return clone

    def to_tensor(self, model: keras.layers.Layer, x: Any) -> tf.Tensor | Batch:
        """``x`` as a dense eager tensor (a ``tf.Variable`` is read once: the sampling never sees the variable,
        so nothing traced for it is reused for plain tensors or the other way round), or a dict/tuple of them
        (a :class:`~mcu.structured.Batch`: the model is called with the dict, or the tuple as a list)."""
        if is_structured(x):
            return Batch.convert(x, lambda leaf, name: self._leaf(model, leaf, name))
        return self._leaf(model, x, "x")

    def _leaf(self, model: keras.layers.Layer, x: Any, argument: str) -> tf.Tensor:
        if isinstance(x, np.ndarray):
            tensor = tf.convert_to_tensor(x)
        elif isinstance(x, tf.Variable):
            tensor = tf.convert_to_tensor(x.value())
        elif isinstance(x, (tf.SparseTensor, tf.RaggedTensor)):
            raise InputError(f"{argument}: expected a dense numpy array or tf.Tensor, got a "
                             f"{type(x).__qualname__}; convert it with tf.sparse.to_dense / .to_tensor() first.")
        elif tf.is_tensor(x):
            tensor = tf.convert_to_tensor(x)
        else:
            raise InputError(f"{argument}: expected a numpy array or a tf.Tensor (or, for x, a dict or tuple of "
                             f"them), got {type(x).__qualname__}.")
        if tensor.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(tensor))):
            raise InputError(f"{argument}: contains NaN or infinite values; expected finite inputs.")
        compute = tf.as_dtype(getattr(model, "compute_dtype", None) or tensor.dtype)
        # Keras casts floating inputs to the compute dtype: values beyond its range would become inf
        narrower = tensor.dtype.is_floating and compute.is_floating and compute.size < tensor.dtype.size
        if narrower and not bool(tf.reduce_all(tf.math.is_finite(tf.cast(tensor, compute)))):
            raise InputError(f"{argument}: contains values beyond the range of the model's compute dtype "
                             f"{compute.name} (given {tensor.dtype.name}); expected finite inputs after that "
                             "conversion.")
        return tensor

    def _pass_function(self, model: keras.layers.Layer, session: _switches.Session, x: tf.Tensor) -> Callable:
        """The traced pass for this model, mode, per-example shape, dtype and dropout configuration (a concrete
        function with a free batch size): each input shape is traced once, so Keras checks it against the
        model, and a trace is never reused for an input it was not made for."""
        key = (session.mode, repr(tf.nest.map_structure(lambda t: (tuple(t.shape[1:]), t.dtype.name), x)),
               session.sites.signature)
        with self._lock:
            entry = self._compiled.setdefault(model, {"lock": threading.Lock(), "functions": {}})
        function = entry["functions"].get(key)
        if function is None:
            with entry["lock"]:
                function = entry["functions"].get(key)
                if function is None:
                    body, reached = self._pass_body(model, session)
                    traced = tf.function(body)
                    spec = tf.nest.map_structure(lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), x)
                    function = traced.get_concrete_function(spec, tf.TensorSpec((1,), tf.uint64))
                    _switches.check_reached(session.sites.layers, reached, "a forward pass")
                    entry["functions"][key] = function
        return function

    @staticmethod
    def _pass_body(model: keras.layers.Layer, session: _switches.Session) -> tuple[Callable, set[int]]:
        """``body(x, key)``: one MC pass of ``model`` with the pass's random draws from ``key``; the set that
        collects the sites reached when it is traced."""
        ref, training, reached = weakref.ref(model), session.mode == "training", set()  # no strong reference
        sites = session.sites.without_layers()

        def body(x: tf.Tensor, key: tf.Tensor) -> Any:
            with _switches.active(sites, _keys.seed_values(key, sites), force=not training, reached=reached):
                return ref()(x, training=training)

        return body, reached

    def _run(self, model: keras.layers.Layer, session: _switches.Session, x: Any) -> Any:
        """One traced pass (TensorFlow)."""
        key = session.stream.next_key()
        try:
            if _switches.metering_now():  # traced by activation_bytes: run the Python, seen with static shapes
                return self._pass_body(model, session)[0](x, key)
            with _tape_record.stop_recording():  # no gradients (tracing included), also inside a user's tape
                out = self._pass_function(model, session, x)(x, key)
        except MCUError:
            raise
        except tf.errors.ResourceExhaustedError:
            raise  # not an input problem: lower chunk_size / max_memory
        except Exception as exc:  # noqa: BLE001 - classified: the input's fault or the model's, original as cause
            raise self._model_error(model, x, exc) from exc
        return out

    def select_output(self, out: Any, output: Any) -> tf.Tensor:
        """The tensor to sample from a pass's output: ``out`` itself, or what ``output`` selects from a list,
        tuple or dict output."""
        return select_output(out, output, tf.is_tensor)

    # ---- fast paths ------------------------------------------------------------------------------------------

    def split(self, model: keras.layers.Layer, x: tf.Tensor) -> tuple[Any, str]:
        """A validated prefix/suffix split of a Functional/Sequential model (see :mod:`.split`)."""
        if isinstance(x, Batch):
            return None, STRUCTURED_SPLIT
        session = _switches.session(model)
        sites = session.sites if session is not None and session.sites is not None else self.sites(model)
        with _tape_record.stop_recording():  # validation runs the model eagerly
            split, reason = _split.prefix_split(model, x, sites)
        return (None if split is None else _SplitAdapter(split)), reason

    def generators(self, model: keras.layers.Layer, seeds: list[int]) -> tf.Tensor:
        """One Philox key per sample, ``(k, 1)`` uint64: the split's fast dropout masks of sample ``j`` come
        from ``seeds[j]`` alone (sites without a fast path draw from the block's first key)."""
        return _masks.sample_keys(seeds)

    def activation_bytes(self, run: Callable[[], Any]) -> int | None:
        """Bytes of all leaf-layer outputs produced by ``run()`` (plus the fast suffix's masked and repeated
        tensors): a rough per-pass memory estimate from static shapes. ``run`` is traced, not executed (see
        :func:`_memory.activation_bytes`); only this context's calls are metered."""
        try:
            with _tape_record.stop_recording():
                return _memory.activation_bytes(run) or None
        except Exception:  # noqa: BLE001 - a pass that cannot be traced this way: no estimate (auto caps rows)
            return None

    def nbytes(self, t: tf.Tensor) -> int:
        return int(tf.size(t)) * t.dtype.size

    def repeat(self, x: tf.Tensor | Batch, n: int) -> tf.Tensor | Batch:
        if isinstance(x, Batch):
            return x.map(lambda t: tf.tile(t, [n] + [1] * (len(t.shape) - 1)))
        return tf.tile(x, [n] + [1] * (len(x.shape) - 1))

    def to_numpy(self, t: tf.Tensor) -> np.ndarray:
        if t.dtype in (tf.bfloat16, tf.float16):
            t = tf.cast(t, tf.float32)
        return t.numpy()
