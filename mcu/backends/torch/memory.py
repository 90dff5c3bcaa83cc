"""Memory for the PyTorch backend: activation metering (a rough per-pass estimate for the auto strategy's
budget) and reuse of the fused kernels' large buffers within a thread."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable, Iterator

import torch

from mcu import _host

__all__ = ["ActivationMeter", "made", "measuring", "free_bytes", "reusable_buffer", "weight_bytes"]


_meters = threading.local()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each storage once (tied or shared weights count once)."""
    storages: dict[tuple, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        try:
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, some tensor subclasses)
            storages[("tensor", id(t))] = t.numel() * t.element_size()
    return sum(storages.values())


def free_bytes(device: torch.device) -> int | None:
    """Bytes free on ``device``: the CUDA driver's count on a GPU, host memory available on a CPU (None for
    other devices)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return _host.available_memory()
    return None


@contextlib.contextmanager
def measuring(callback: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``callback`` with every tensor the split's own functions (fast dropout, folded convolution,
    stacking) produce in this thread meanwhile: they are not module calls, which forward hooks would see."""
    active = _meters.__dict__.setdefault("active", [])
    active.append(callback)
    try:
        yield
    finally:
        active.remove(callback)


def made(t: torch.Tensor) -> torch.Tensor:
    for callback in getattr(_meters, "active", ()):
        callback(t)
    return t


def reusable_buffer(masks: Any, role: tuple, shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for ``role``, made from this thread's buffer of an earlier block or call when
    nothing references that buffer any more (else a new one, kept for next time), so large buffers are not
    allocated afresh on every call (torch's CPU allocator does not cache them, and fresh pages fault in).
    ``masks``: the block's :class:`~mcu.backends.torch.kernels.Masks` (its ``buffers`` dict), or None."""
    kept = None if masks is None or masks.buffers is None else masks.buffers.get(role)
    numel = math.prod(shape)
    if kept is not None and kept.dtype == dtype and kept.device == device and kept.numel() >= numel \
            and _unreferenced(kept):
        return kept[:numel].view(shape)
    out = torch.empty(numel, dtype=dtype, device=device)
    if masks is not None and masks.buffers is not None:
        masks.buffers[role] = out
    return out.view(shape)


def _use_count(t: torch.Tensor) -> int | None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private
    return None if use_count is None else use_count(t.untyped_storage()._cdata)


@functools.lru_cache(maxsize=1)
def _alone_count() -> int | None:
    """The use count of a tensor nothing else references, measured once (it includes torch's bookkeeping)."""
    return _use_count(torch.empty(1))


def _unreferenced(t: torch.Tensor) -> bool:
    """Whether ``t`` is the only tensor using its memory (no view of it is alive: not in a caller's result, a
    hook's keeping, an array made from it): its storage use count equals that of a fresh, unshared tensor.
    Without the private API, False."""
    count = _use_count(t)
    return count is not None and count == _alone_count()


class ActivationMeter:
    """Sums the bytes of every leaf module's output during a pass (a global hook, removed on exit), and of the
    tensors the split's own functions make."""

    def __init__(self) -> None:
        self.bytes = 0
        self._thread = threading.get_ident()  # the hook is global: other threads' passes are not ours

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        if next(module.children(), None) is None and isinstance(output, torch.Tensor):
            self.bytes += output.numel() * output.element_size()

    def _add(self, t: torch.Tensor) -> None:
        self.bytes += t.numel() * t.element_size()

    def __enter__(self) -> "ActivationMeter":
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        self._split_tensors = measuring(self._add)  # fast dropout etc. are not module calls
        self._split_tensors.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self._split_tensors.__exit__(*exc)
