"""Attention dropout of a PyTorch twin with masks from the call's random stream.

``F.scaled_dot_product_attention(..., dropout_p > 0)`` has no fused CPU kernel: torch runs its math path,
which draws the mask with ``bernoulli_`` from the global generator, upcasts bf16/fp16 inputs to float32 for the
whole computation and screens every row for full masking. A twin's attention modules (the modules the probe saw
calling it with dropout) run their forward under :class:`_AttentionMode`, which computes that math path itself:
the same distribution (each attention probability kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``,
independently per element), with the mask from the call's counter-based stream
(:func:`mcu.backends.torch.masks.bernoulli_masks`) and, for reduced-precision inputs, the probabilities times the
values in the inputs' precision (the matmul autocast would run in it) while scores and softmax stay float32.
Anything else (no dropout, grouped-query attention, nested tensors, tracing) runs natively.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mcu.backends.torch.masks import Streams, bernoulli_masks, keep_bits

__all__ = ["ATTENTION_OP", "attention", "stream_attention"]

#: The name under which the twin's probe records an attention call.
ATTENTION_OP = "scaled_dot_product_attention"
_REDUCED = (torch.bfloat16, torch.float16)

#: ``sources()`` -> ``(streams, generator, min_elements)``: the call's stream, its seeded generator (or None),
#: and the fewest elements a mask must have to come from the stream, keyed by "the keep rate is dyadic".
Sources = Callable[[], tuple[Streams | None, torch.Generator | None, dict[bool, int]]]


def _arguments(args: tuple, kwargs: dict) -> tuple[Any, ...] | None:
    """``(query, key, value, attn_mask, dropout_p, is_causal, scale)`` of a call this module computes itself, or
    None for one it leaves to torch."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    if len(args) > len(names) or set(kwargs) - set(names) - {"scale", "enable_gqa"}:
        return None
    bound = dict(zip(names, args))
    if set(bound) & set(kwargs):
        return None
    bound.update(kwargs)
    if bound.get("enable_gqa", False) or any(n not in bound for n in names[:3]):
        return None
    q, k, v = bound["query"], bound["key"], bound["value"]
    p, mask = bound.get("dropout_p", 0.0), bound.get("attn_mask")
    if mask is not None and bound.get("is_causal", False):  # torch refuses the pair: let it say so
        return None
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if not all(type(t) is torch.Tensor and not t.is_nested for t in tensors):
        return None
    if not isinstance(p, float) or not 0.0 < p < 1.0 or q.dim() < 2 or q.dtype != k.dtype or q.dtype != v.dtype:
        return None
    if not q.is_floating_point() or torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return q, k, v, mask, p, bool(bound.get("is_causal", False)), bound.get("scale")


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float, is_causal: bool, scale: float | None,
              masks: Callable[[tuple[int, ...], float], torch.Tensor]) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with dropout, its mask from ``masks(shape, keep)`` (0/1 values, any
    dtype). Fully masked rows give zeros (as torch's math path); reduced-precision inputs give scores and softmax
    in float32 and the product with ``value`` in their own precision."""
    keep = 1.0 - dropout_p
    acc = torch.float32 if query.dtype in _REDUCED else query.dtype
    with torch.autocast(query.device.type, enabled=False):  # the precisions below are this function's choice
        scores = torch.matmul(query.to(acc, memory_format=torch.contiguous_format),
                              key.to(acc, memory_format=torch.contiguous_format).transpose(-2, -1))
        scores.mul_(1.0 / math.sqrt(query.size(-1)) if scale is None else scale)
        if is_causal:  # never with attn_mask (refused by torch, left to it by _arguments)
            rows, cols = query.size(-2), key.size(-2)
            attn_mask = torch.ones(rows, cols, dtype=torch.bool, device=query.device).tril()
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask.logical_not(), -math.inf)
            else:
                scores = scores + attn_mask
        probs = torch.softmax(scores, -1)
        if attn_mask is not None:  # rows with every position masked: zeros, not NaN (torch's _safe_softmax)
            probs = probs.masked_fill(scores.isneginf().all(-1, keepdim=True), 0.0)
        probs.mul_(masks(tuple(probs.shape), keep))
        out = torch.matmul(probs.to(value.dtype), value)
        return out.mul_(1.0 / keep)


class _AttentionMode(TorchFunctionMode):
    """Computes ``F.scaled_dot_product_attention`` calls with dropout with masks from the call's stream (or its
    seeded generator, for masks too small for a stream); every other function runs unchanged."""

    def __init__(self, sources: Sources) -> None:
        super().__init__()
        self.sources = sources

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = _arguments(args, kwargs)
            masks = None if bound is None else self._masks(bound)
            if masks is not None:
                return attention(*bound, masks=masks)
        return func(*args, **kwargs)

    def _masks(self, bound: tuple) -> Callable[[tuple[int, ...], float], torch.Tensor] | None:
        query, key, dropout_p = bound[0], bound[1], bound[4]
        streams, generator, min_elements = self.sources()
        shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]) + (query.size(-2), key.size(-2))
        keep = 1.0 - dropout_p
        if streams is not None and math.prod(shape) >= min_elements[keep_bits(keep)[0] > 0]:
            return lambda shape, keep: bernoulli_masks(shape, keep, streams, query.device)[0]
        if generator is not None:
            return lambda shape, keep: torch.empty(shape, device=query.device).bernoulli_(keep, generator=generator)
        return None


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing (``torch.compiler.is_compiling`` exists from torch 2.3)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def stream_attention(module: nn.Module, sources: Sources) -> Callable[..., Any]:
    """``module.forward`` with its attention dropout computed by :func:`attention` whenever the call has a
    stream or a seeded generator (natively otherwise, and while ``torch.fx`` or ``torch.compile`` traces)."""
    native = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        streams, generator, _ = sources()
        if (streams is None and generator is None) or _compiling() \
                or any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            return native(module, *args, **kwargs)
        with _AttentionMode(sources):
            return native(module, *args, **kwargs)

    return forward
