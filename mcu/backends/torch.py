"""PyTorch backend: only ``_DropoutNd`` modules in train mode, everything else in eval mode."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.nn.modules.dropout import _DropoutNd

from mcu.backends import _torch_graph, _torch_rng
from mcu.errors import InputError, NoDropoutError

__all__ = ["TorchBackend"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        return tensor.device, tensor.dtype
    for tensor in model.buffers():
        return tensor.device, (tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype())
    return torch.device("cpu"), torch.get_default_dtype()


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in text or "can't allocate" in text


class TorchBackend:
    """MC dropout for ``torch.nn.Module`` models."""

    name = "torch"
    dropout_types = (_DropoutNd,)  # Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout

    def __init__(self) -> None:
        self._splits: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()

    def is_model(self, obj: Any) -> bool:
        keras = sys.modules.get("keras")
        if keras is not None and isinstance(obj, keras.layers.Layer):
            return False  # a Keras 3 layer on the torch backend belongs to the Keras backend
        return isinstance(obj, torch.nn.Module)

    def dropout_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        layers = [m for m in model.modules() if isinstance(m, self.dropout_types) or _torch_graph.scripted_dropout(m)]
        if not layers:
            raise NoDropoutError(
                f"model: {type(model).__qualname__} has no dropout module, so every MC sample would be "
                "identical; expected at least one of torch.nn.Dropout, Dropout1d, Dropout2d, Dropout3d, "
                "AlphaDropout, FeatureAlphaDropout (functional F.dropout calls are not seen)."
            )
        return layers

    @contextlib.contextmanager
    def mc_mode(self, model: torch.nn.Module, mode: str = "dropout") -> Iterator[None]:
        dropouts = self.dropout_layers(model)
        flags = [(module, module.training) for module in model.modules()]
        # In training mode BatchNorm updates its running statistics: snapshot every buffer to restore it.
        saved = [(b, b.detach().clone()) for b in model.buffers()] if mode == "training" else []
        try:
            if mode == "training":
                model.train()
            else:
                model.eval()
                for module in dropouts:
                    module.train()
            with torch.no_grad():
                yield
        finally:
            for module, flag in flags:
                module.training = flag
            with torch.no_grad():
                for buffer, copy in saved:
                    buffer.copy_(copy)

    @contextlib.contextmanager
    def seeded(self, model: torch.nn.Module, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        device, _ = _model_device_dtype(model)
        cuda = [device.index or 0] if device.type == "cuda" else []
        # fork_rng restores the global generators afterwards: the user's RNG stream is not disturbed.
        with torch.random.fork_rng(devices=cuda):
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

    def to_tensor(self, model: torch.nn.Module, x: Any) -> torch.Tensor:
        device, dtype = _model_device_dtype(model)
        if isinstance(x, torch.Tensor):
            tensor = x.detach()
        elif isinstance(x, np.ndarray):
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise InputError("x: contains NaN or infinite values; expected finite inputs.")
            tensor = torch.from_numpy(np.ascontiguousarray(x))
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)  # numpy float64 -> the model's parameter dtype (documented)
        else:
            raise InputError(f"x: expected a numpy array or a torch.Tensor, got {type(x).__qualname__}.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):  # checked after the cast
            beyond = f" after conversion to {tensor.dtype} (values beyond its range)" if isinstance(x, np.ndarray) else ""
            raise InputError(f"x: contains NaN or infinite values{beyond}; expected finite inputs.")
        return tensor.to(device)

    def forward(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            out = model(x)
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
        if not isinstance(out, torch.Tensor):
            raise InputError(
                f"model: expected the forward pass to return one tensor, got {type(out).__qualname__}; "
                "wrap the model so that it returns a single tensor (e.g. stack mean and log-variance)."
            )
        return out

    # ---- fast paths (prefix caching, cheap masks, threads, memory estimates) ----------------------------------

    def split(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, str]:
        """A validated prefix/suffix split of ``model`` (inside :meth:`mc_mode`), cached per model, module
        structure and per-example input shape; ``(None, reason)`` when the model cannot be split."""
        structure = tuple(id(m) for m in model.modules())
        key = (structure, tuple(x.shape[1:]), x.dtype)
        cache = self._splits.setdefault(model, {})
        dropouts = self.dropout_layers(model)
        state = _torch_graph.attribute_state(model)
        if key in cache and cache[key][0] is not None:
            split, why, seen = cache[key]
            # the trace baked plain attributes in as constants: when one changed, re-check the split (a few rows)
            if state == seen or _torch_graph.still_valid(split, model, dropouts, x):
                cache[key] = (split, why, state)
                return split, why
        if key not in cache or cache[key][0] is not None:
            cache.clear()  # a changed structure, input shape or attribute invalidates older splits
            cache[key] = (*_torch_graph.split_model(model, dropouts, x, self.dropout_types), state)
        return cache[key][:2]

    def generators(self, model: torch.nn.Module, seeds: list[int]) -> _torch_rng.Streams:
        """One counter-based random stream per sample (the fast dropout masks draw from them, never from the
        global RNG), on the model's device."""
        device, _ = _model_device_dtype(model)
        return _torch_rng.Streams(seeds, device)

    @contextlib.contextmanager
    def worker_threads(self, workers: int) -> Iterator[None]:
        """One intra-op thread per worker while ``workers`` Python threads run (process-wide; restored)."""
        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, previous // workers))
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    @contextlib.contextmanager
    def worker_context(self, model: torch.nn.Module, precision: str) -> Iterator[None]:
        """What :meth:`mc_mode` and :meth:`precision` set up, for a worker thread (both are thread-local)."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fp16 warning was given once already
            with self.precision(model, precision):
                yield

    def activation_bytes(self, run: Callable[[], Any]) -> int | None:
        """Bytes of all leaf-module outputs produced by ``run()`` (a rough per-pass memory estimate)."""
        with _ActivationMeter() as meter:
            run()
        return meter.bytes or None

    def nbytes(self, t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def repeat(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return _torch_graph.repeat_rows(x, n)

    def to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.cpu().numpy()


def _raised_by_torch(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc`` is torch's (an op refused its tensors), not the model's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_filename.startswith(os.path.dirname(torch.__file__))


class _ActivationMeter:
    """Sums the bytes of every leaf module's output during a pass (a global hook, removed on exit), and of the
    tensors the split's own functions make."""

    def __init__(self) -> None:
        self.bytes = 0

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if next(module.children(), None) is None and isinstance(output, torch.Tensor):
            self.bytes += output.numel() * output.element_size()

    def _add(self, t: torch.Tensor) -> None:
        self.bytes += t.numel() * t.element_size()

    def __enter__(self) -> "_ActivationMeter":
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        self._split_tensors = _torch_graph.measuring(self._add)  # fast dropout etc. are not module calls
        self._split_tensors.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self._split_tensors.__exit__(*exc)
