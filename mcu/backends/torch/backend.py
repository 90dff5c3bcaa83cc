"""PyTorch backend: every dropout site of the model stochastic, everything else in eval mode, on a twin.

Sampling never touches the user's model: passes run on a parameter-sharing twin whose training flags are its
own (:mod:`mcu.backends.torch.twin`), so calls from many threads, and plain inference on the same model, do
not interfere.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.nn.modules.dropout import _DropoutNd

from mcu.backends.torch import masks as _masks, memory as _memory, split as _split, twin as _twin
from mcu.errors import DropoutSiteWarning, InputError, NoDropoutError
from mcu.structured import Batch, is_structured, select_output

__all__ = ["TorchBackend"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Held while a seeded call owns torch's global generators (dropout inside functional calls, attention and
#: RNN kernels draws from them): seeded calls are serialised, unseeded ones never wait for it.
_GLOBAL_RNG = threading.RLock()
#: Calls currently running worker threads, and the intra-op thread count to restore when the last one ends.
_THREADS: dict[str, Any] = {"lock": threading.Lock(), "users": 0, "saved": 1}


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        return tensor.device, tensor.dtype
    for tensor in model.buffers():
        return tensor.device, (tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype())
    return torch.device("cpu"), torch.get_default_dtype()


_TWIN_KEY = "_mcu_twin"


def _twin_info(module: torch.nn.Module) -> _twin.Twin | None:
    """The :class:`~mcu.backends.torch.twin.Twin` whose module ``module`` is (None for any other module)."""
    ref = module.__dict__.get(_TWIN_KEY)
    return None if ref is None else ref()


def _static_site(module: torch.nn.Module) -> bool:
    """A dropout site visible without running the model, with a rate > 0."""
    if isinstance(module, _DropoutNd):
        return module.p > 0.0
    if isinstance(module, torch.nn.MultiheadAttention):
        return module.dropout > 0.0
    if isinstance(module, torch.nn.RNNBase):
        return module.dropout > 0.0 and module.num_layers > 1
    return _split.scripted_dropout(module) and float(getattr(module, "p", 0.0)) > 0.0


def _warn_sites(message: str) -> None:
    warnings.warn(message, DropoutSiteWarning, stacklevel=6)


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in text or "can't allocate" in text


class TorchBackend:
    """MC dropout for ``torch.nn.Module`` models."""

    name = "torch"
    dropout_types = (_DropoutNd,)  # Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout

    def __init__(self) -> None:
        self._splits: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
        self._splits_lock = threading.Lock()
        self._twins = _twin.TwinCache()

    def is_model(self, obj: Any) -> bool:
        keras = sys.modules.get("keras")
        if keras is not None and isinstance(obj, keras.layers.Layer):
            return False  # a Keras 3 layer on the torch backend belongs to the Keras backend
        return isinstance(obj, torch.nn.Module)

    def dropout_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The dropout modules with a rate > 0 that can be seen without running the model (``nn.Dropout*``,
        ``nn.MultiheadAttention``/``nn.RNN``-family dropout, TorchScript dropout). Dropout in functional calls
        is only seen by running the model (:meth:`mc_mode` raises ``NoDropoutError`` if there is none), so an
        empty list is no error here."""
        return [m for m in model.modules() if _static_site(m)]

    def twin(self, model: torch.nn.Module, mode: str, x: torch.Tensor) -> _twin.Twin:
        """The twin that sampling runs on (built on first use for ``model`` and ``mode``; see
        :mod:`mcu.backends.torch.twin`)."""
        def make() -> _twin.Twin:
            with _GLOBAL_RNG, torch.no_grad():  # the probe draws (and restores) the global generators
                twin = _twin.build(model, mode, x, self.forward, NoDropoutError, _warn_sites)
            twin.module.__dict__[_TWIN_KEY] = weakref.ref(twin)
            return twin

        return self._twins.get(model, mode, make)

    @contextlib.contextmanager
    def mc_mode(self, model: torch.nn.Module, mode: str = "dropout", x: Any = None) -> Iterator[torch.nn.Module]:
        """Yields the module to run the passes on: the model's twin, dropout on (``mode="dropout"``) or every
        module in training mode (``"training"``). The user's model is not modified at all."""
        if x is None:
            raise TypeError("TorchBackend.mc_mode needs the converted input x (the twin is probed with it)")
        twin = self.twin(model, mode, x)
        device, _ = _model_device_dtype(model)
        # The twin's dropout modules draw from this stream (fresh entropy; seeded() replaces it for a seed).
        entropy = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
        with torch.no_grad(), _twin.call_streams(_masks.Streams([entropy], device)):
            yield twin.module

    def stacking_problem(self, model: torch.nn.Module, split: Any = None) -> str | None:
        """Why stacked copies of the batch in one pass would share randomness (None: they would not)."""
        twin = _twin_info(model)
        return None if twin is None else twin.stacking_problem

    @contextlib.contextmanager
    def seeded(self, model: torch.nn.Module, seed: int | None) -> Iterator[None]:
        """Reproducible from ``seed`` inside the block (``model``: the twin the passes run on). The twin's
        dropout modules draw from a stream of the call's own; only when some random operation draws from
        torch's global generators (functional, attention or RNN dropout, ...) are those seeded too — under a
        process-wide lock, and restored afterwards, so the user's random stream is not disturbed."""
        if seed is None:
            yield
            return
        device, _ = _model_device_dtype(model)
        twin = _twin_info(model)
        generator = torch.Generator(device).manual_seed(seed)
        with _twin.call_streams(_masks.Streams([seed], device), generator):
            if twin is not None and not twin.global_rng:
                yield
                return
            cuda = [device.index or 0] if device.type == "cuda" else []
            with _GLOBAL_RNG, torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                yield

    def model_for_precision(self, model: torch.nn.Module, precision: str) -> torch.nn.Module:
        return model  # precision is applied by autocast (see precision())

    def precision(self, model: torch.nn.Module, precision: str) -> contextlib.AbstractContextManager:
        if precision == "fp32":
            return contextlib.nullcontext()
        device, _ = _model_device_dtype(model)
        if device.type == "cpu" and precision == "fp16" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            warnings.warn(
                "precision='fp16': this CPU has no native float16 arithmetic; fp16 is emulated and usually "
                "much slower than fp32. Use precision='bf16' (or 'fp32') here.",
                RuntimeWarning,
                stacklevel=4,
            )
        return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])

    def to_tensor(self, model: torch.nn.Module, x: Any) -> torch.Tensor | Batch:
        """``x`` as a tensor on the model's device (numpy floats in the model's dtype), or a dict/tuple of them
        (a :class:`~mcu.structured.Batch`, passed to the model by name / in order)."""
        if is_structured(x):
            return Batch.convert(x, lambda leaf, name: self._leaf(model, leaf, name))
        return self._leaf(model, x, "x")

    def _leaf(self, model: torch.nn.Module, x: Any, argument: str) -> torch.Tensor:
        device, dtype = _model_device_dtype(model)
        if isinstance(x, torch.Tensor):
            tensor = x.detach()
        elif isinstance(x, np.ndarray):
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise InputError(f"{argument}: contains NaN or infinite values; expected finite inputs.")
            tensor = torch.from_numpy(np.ascontiguousarray(x))
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)  # numpy float64 -> the model's parameter dtype (documented)
        else:
            raise InputError(f"{argument}: expected a numpy array or a torch.Tensor (or, for x, a dict or tuple of "
                             f"them), got {type(x).__qualname__}.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):  # checked after the cast
            beyond = f" after conversion to {tensor.dtype} (values beyond its range)" if isinstance(x, np.ndarray) else ""
            raise InputError(f"{argument}: contains NaN or infinite values{beyond}; expected finite inputs.")
        return tensor.to(device)

    def forward(self, model: torch.nn.Module, x: torch.Tensor | Batch) -> Any:
        """One pass: the model's raw output (a tensor or a structure; see :meth:`select_output`)."""
        try:
            out = x.call(model) if isinstance(x, Batch) else model(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if _out_of_memory(exc):
                raise  # not an input problem: lower chunk_size / max_memory
            if not _raised_by_torch(exc):  # the model's own code raised: do not blame the input
                raise InputError(f"model: the model raised {type(exc).__name__}: {exc} (on x of per-example shape "
                                 f"{tuple(x.shape[1:])}; the original exception is the cause)") from exc
            raise InputError(
                f"x: the model rejected inputs of per-example shape {tuple(x.shape[1:])} and dtype {x.dtype} "
                f"(a pass of {x.shape[0]} rows): {exc}"
            ) from exc
        return out

    def select_output(self, out: Any, output: Any) -> torch.Tensor:
        """The tensor to sample from a pass's output: ``out`` itself, or what ``output`` selects from a tuple,
        dict or Hugging Face ``ModelOutput``."""
        return select_output(out, output, lambda t: isinstance(t, torch.Tensor))

    # ---- fast paths (prefix caching, cheap masks, threads, memory estimates) ----------------------------------

    def split(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, str]:
        """A validated prefix/suffix split of a sampling twin (the module :meth:`mc_mode` yields), cached per twin
        and per-example input shape; ``(None, reason)`` when the model cannot be split."""
        twin = _twin_info(model)
        if twin is None:
            return None, "not a sampling twin (call inside mc_mode)"
        if isinstance(x, Batch):
            return None, "the model takes structured inputs; prefix caching supports one input tensor"
        key = (tuple(x.shape[1:]), x.dtype)
        state = _split.attribute_state(model)
        with self._splits_lock:
            entry = self._splits.setdefault(model, {}).get(key)
        if entry is not None and entry[0] is not None:
            split, why, seen = entry
            # the trace baked plain attributes in as constants: when one changed, re-check the split (a few rows)
            if state == seen or _split.still_valid(split, twin, x):
                with self._splits_lock:
                    self._splits[model][key] = (split, why, state)
                return split, why
        if entry is None or entry[0] is not None:
            entry = (*_split.split_model(twin, x, self.dropout_types), state)
            with self._splits_lock:
                cache = self._splits.setdefault(model, {})
                cache.clear()  # a changed input shape or attribute invalidates older splits
                cache[key] = entry
        return entry[:2]

    def generators(self, model: torch.nn.Module, seeds: list[int]) -> _masks.Streams:
        """One counter-based random stream per sample (the fast dropout masks draw from them, never from the
        global RNG), on the model's device."""
        device, _ = _model_device_dtype(model)
        return _masks.Streams(seeds, device)

    @contextlib.contextmanager
    def worker_threads(self, workers: int) -> Iterator[None]:
        """One intra-op thread per worker while ``workers`` Python threads run. The setting is process-wide:
        concurrent calls share it (the first one in saves the user's setting, the last one out restores it)."""
        with _THREADS["lock"]:
            if _THREADS["users"] == 0:
                _THREADS["saved"] = torch.get_num_threads()
            _THREADS["users"] += 1
            torch.set_num_threads(max(1, _THREADS["saved"] // workers))
        try:
            yield
        finally:
            with _THREADS["lock"]:
                _THREADS["users"] -= 1
                if _THREADS["users"] == 0:
                    torch.set_num_threads(_THREADS["saved"])

    @contextlib.contextmanager
    def worker_context(self, model: torch.nn.Module, precision: str) -> Iterator[None]:
        """What :meth:`mc_mode` and :meth:`precision` set up, for a worker thread (both are thread-local)."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fp16 warning was given once already
            with self.precision(model, precision):
                yield

    def activation_bytes(self, run: Callable[[], Any]) -> int | None:
        """Bytes of all leaf-module outputs produced by ``run()`` (a rough per-pass memory estimate)."""
        with _memory.ActivationMeter() as meter:
            run()
        return meter.bytes or None

    def nbytes(self, t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def weight_bytes(self, model: torch.nn.Module) -> int:
        return _memory.weight_bytes(model)

    def free_bytes(self, model: torch.nn.Module) -> int | None:
        return _memory.free_bytes(_model_device_dtype(model)[0])

    def repeat(self, x: torch.Tensor | Batch, n: int) -> torch.Tensor | Batch:
        if isinstance(x, Batch):
            return x.map(lambda t: _split.repeat_rows(t, n))
        return _split.repeat_rows(x, n)

    def to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.cpu().numpy()


#: Frames of torch and of this backend's own wrappers (the twin's probe and dropout, the split's functions): an
#: exception raised there is an op refusing its tensors, not the model's own code.
_FRAMEWORK_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def _raised_by_torch(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc`` is torch's (an op refused its tensors), not the model's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_filename.startswith(_FRAMEWORK_DIRS)
