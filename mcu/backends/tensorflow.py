"""TensorFlow / Keras 3 backend: dropout-family layers run with ``training=True``, everything else in
inference mode (BatchNormalization uses its moving statistics, augmentation layers are inactive).

How: inside :meth:`KerasBackend.mc_mode` each dropout layer gets an instance-level ``call`` that forces
``training=True``, and the model is called with ``training=False``. The instance attribute is removed on exit,
so the layer's class behaviour is untouched. Forward passes run through a ``tf.function`` cached per model.
The dropout layers' seed-generator states are saved and restored, so sampling leaves no trace in the model.

Prefix/parallel strategies run a split of Functional/Sequential models (:mod:`._keras_graph`) in which
Dropout and SpatialDropout1D/2D/3D draw exact masks from one Philox stream per sample
(:meth:`KerasBackend.generators`), so a seeded result does not depend on how samples are grouped into passes
or threads; other dropout kinds keep drawing from their seed generators.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from mcu.backends import _keras_graph
from mcu.errors import InputError, NoDropoutError

__all__ = ["KerasBackend"]

_DROPOUT_TYPES = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout)
# SpatialDropout1D/2D/3D subclass keras.layers.Dropout.
_DROPOUT_NAMES = "Dropout, SpatialDropout1D, SpatialDropout2D, SpatialDropout3D, GaussianDropout, AlphaDropout"
_MISSING = object()
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


def _all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer reachable from ``model``: nested models and layers held by subclassed models included."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def _force_training(call: Callable[..., Any]) -> Callable[..., Any]:
    def call_in_training_mode(*args: Any, **kwargs: Any) -> Any:
        kwargs["training"] = True
        return call(*args, **kwargs)

    return call_in_training_mode


def _seed_states(layers: list[keras.layers.Layer]) -> list[Any]:
    states = []
    for layer in layers:
        generator = getattr(layer, "seed_generator", None)
        if generator is not None:
            states.append(generator.state)
    return states


class _Frontier(list):
    """The frontier of ``rows`` examples as :meth:`_SplitAdapter.prefix` returns it (a list of tensors).

    The strategies pass it back unrepeated (``repeats_frontier``): the split stacks the copies itself,
    broadcasting the dropout masks against it instead of materialising ``k`` copies.
    """

    rows: int


class _SplitAdapter:
    """The strategies' split interface over a :class:`_keras_graph.KerasSplit`.

    ``suffix(frontier, generators)``: ``generators`` are per-sample Philox keys (:meth:`KerasBackend.generators`);
    sample ``j``'s fast dropout masks depend on its key alone, so blocks may be grouped in any way and run on
    parallel threads. ``native_rng`` is True when some dropout of the suffix has no fast path (GaussianDropout,
    AlphaDropout, a dropout inside a subclassed layer, ...) and draws from its Keras seed generator instead:
    shared state, so the result then depends on the grouping and threads would make it irreproducible.
    """

    repeats_frontier = True

    def __init__(self, split: Any) -> None:
        self._split = split

    @property
    def native_rng(self) -> bool:
        return self._split.native_rng

    def prefix(self, x: tf.Tensor) -> list[tf.Tensor]:
        frontier = _Frontier(self._split.prefix(x))
        frontier.rows = int(frontier[0].shape[0])
        return frontier

    def suffix(self, frontier: list[tf.Tensor], generators: Any) -> tf.Tensor:
        # the prefix's own list: N rows standing for len(generators) copies; anything else: stacked copies
        broadcast = isinstance(frontier, _Frontier) and int(frontier[0].shape[0]) == frontier.rows
        return self._split.sample(list(frontier), generators, broadcast=broadcast)

    @property
    def description(self) -> str:
        return self._split.describe()

    @property
    def fast_layers(self) -> list[Any]:
        """The dropout layers whose masks the split draws itself, per sample."""
        return self._split.fast_layers


class KerasBackend:
    """MC dropout for Keras 3 models (Sequential, Functional, subclassed, nested) on TensorFlow."""

    name = "tensorflow"
    dropout_types = _DROPOUT_TYPES

    def __init__(self) -> None:
        self._compiled: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()
        self._mode = threading.local()

    def is_model(self, obj: Any) -> bool:
        return isinstance(obj, keras.layers.Layer)

    def dropout_layers(self, model: keras.layers.Layer) -> list[keras.layers.Layer]:
        layers = [layer for layer in _all_layers(model) if isinstance(layer, self.dropout_types)]
        if not layers:
            raise NoDropoutError(
                f"model: {type(model).__qualname__} has no dropout layer, so every MC sample would be "
                f"identical; expected at least one of keras.layers.{_DROPOUT_NAMES}."
            )
        return layers

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
    def mc_mode(self, model: keras.layers.Layer, mode: str = "dropout") -> Iterator[None]:
        dropouts = self.dropout_layers(model)
        patched: list[tuple[keras.layers.Layer, Any]] = []
        # Training mode may update BatchNorm moving statistics: snapshot every variable to restore it exactly.
        saved = [(v, v.numpy()) for v in model.variables] if mode == "training" else []
        previous_mode = getattr(self._mode, "value", None)
        previous_model = getattr(self._mode, "model", None)
        try:
            if mode == "dropout":
                for layer in dropouts:
                    patched.append((layer, layer.__dict__.get("call", _MISSING)))
                    layer.call = _force_training(layer.call)
            self._mode.value, self._mode.model = mode, model
            yield
        finally:
            self._mode.value, self._mode.model = previous_mode, previous_model
            for layer, original in reversed(patched):
                if original is _MISSING:
                    del layer.call
                else:
                    layer.call = original
            for variable, value in saved:
                variable.assign(value)

    @contextlib.contextmanager
    def seeded(self, model: keras.layers.Layer, seed: int | None) -> Iterator[None]:
        states = _seed_states(self.dropout_layers(model))
        originals = [state.numpy() for state in states]
        # Fresh entropy when no seed is given: restoring the states afterwards must not replay old masks.
        words = np.random.SeedSequence(seed).generate_state(2 * len(states), dtype=np.uint32)
        try:
            for i, state in enumerate(states):
                state.assign(np.asarray([words[2 * i], words[2 * i + 1]], dtype=originals[i].dtype))
            yield
        finally:
            for state, value in zip(states, originals):
                state.assign(value)

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
        clone = _keras_graph.precision_clone(model, _POLICIES[precision])
        if clone is None:
            raise InputError(
                f"precision: {precision!r} on the tensorflow backend needs a Functional or Sequential Keras model "
                f"(it is run as a {_POLICIES[precision]} copy); {type(model).__qualname__} cannot be cloned. "
                "Expected precision='fp32', or build the model under keras.mixed_precision yourself."
            )
        return clone

    def precision(self, model: keras.layers.Layer, precision: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the precision lives in the model copy (model_for_precision)

    def to_tensor(self, model: keras.layers.Layer, x: Any) -> tf.Tensor:
        if isinstance(x, np.ndarray):
            tensor = tf.convert_to_tensor(x)
        elif tf.is_tensor(x):
            tensor = x
        else:
            raise InputError(f"x: expected a numpy array or a tf.Tensor, got {type(x).__qualname__}.")
        if tensor.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(tensor))):
            raise InputError("x: contains NaN or infinite values; expected finite inputs.")
        compute = tf.as_dtype(getattr(model, "compute_dtype", None) or tensor.dtype)
        # Keras casts floating inputs to the compute dtype: values beyond its range would become inf
        narrower = tensor.dtype.is_floating and compute.is_floating and compute.size < tensor.dtype.size
        if narrower and not bool(tf.reduce_all(tf.math.is_finite(tf.cast(tensor, compute)))):
            raise InputError(f"x: contains values beyond the range of the model's compute dtype {compute.name} "
                             f"(given {tensor.dtype.name}); expected finite inputs after that conversion.")
        return tensor

    def _function(self, model: keras.layers.Layer, mode: str) -> Callable[[tf.Tensor], tf.Tensor]:
        functions = self._compiled.setdefault(model, {})
        if mode not in functions:
            training, ref = mode == "training", weakref.ref(model)  # no strong reference: the model can be freed
            functions[mode] = tf.function(lambda x: ref()(x, training=training), reduce_retracing=True)
        return functions[mode]

    def forward(self, model: keras.layers.Layer, x: tf.Tensor) -> tf.Tensor:
        mode = getattr(self._mode, "value", None)
        if mode is None:
            raise RuntimeError("KerasBackend.forward must run inside mc_mode()")
        try:
            out = self._function(model, mode)(x)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            raise InputError(
                f"x: the model rejected inputs of per-example shape {tuple(x.shape[1:])} and dtype {x.dtype.name} "
                f"(a pass of {x.shape[0]} rows): {exc}"
            ) from exc
        if not tf.is_tensor(out):
            raise InputError(
                f"model: expected the forward pass to return one tensor, got {type(out).__qualname__}; "
                "wrap the model so that it returns a single tensor (e.g. concatenate mean and log-variance)."
            )
        return out

    # ---- fast paths ------------------------------------------------------------------------------------------

    def split(self, model: keras.layers.Layer, x: tf.Tensor) -> tuple[Any, str]:
        """A validated prefix/suffix split of a Functional/Sequential model (see :mod:`._keras_graph`)."""
        split, reason = _keras_graph.prefix_split(model, x, dropout_types=self.dropout_types)
        return (None if split is None else _SplitAdapter(split)), reason

    def generators(self, model: keras.layers.Layer, seeds: list[int]) -> tf.Tensor:
        """One Philox key per sample, ``(k, 1)`` uint64: the split's fast dropout masks of sample ``j`` come
        from ``seeds[j]`` alone (dropouts without a fast path still draw from their seed generators)."""
        return _keras_graph.sample_keys(seeds)

    @contextlib.contextmanager
    def worker_threads(self, workers: int) -> Iterator[None]:
        """Nothing to divide: TensorFlow's intra-op thread pool is process-wide and fixed once it started."""
        yield

    def worker_context(self, model: keras.layers.Layer, precision: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def activation_bytes(self, run: Callable[[], Any]) -> int | None:
        """Bytes of all leaf-layer outputs produced by ``run()`` (plus the fast suffix's masked and repeated
        tensors): a rough per-pass memory estimate from static shapes. ``run`` is traced, not executed (see
        :func:`_keras_graph.activation_bytes`); call inside :meth:`mc_mode`, whose model is metered."""
        model = getattr(self._mode, "model", None)
        if model is None:
            return None
        try:
            return _keras_graph.activation_bytes(model, run) or None
        except Exception:  # noqa: BLE001 - a pass that cannot be traced this way: no estimate (auto caps rows)
            return None

    def nbytes(self, t: tf.Tensor) -> int:
        return int(tf.size(t)) * t.dtype.size

    def repeat(self, x: tf.Tensor, n: int) -> tf.Tensor:
        return tf.tile(x, [n] + [1] * (len(x.shape) - 1))

    def to_numpy(self, t: tf.Tensor) -> np.ndarray:
        if t.dtype in (tf.bfloat16, tf.float16):
            t = tf.cast(t, tf.float32)
        return t.numpy()
