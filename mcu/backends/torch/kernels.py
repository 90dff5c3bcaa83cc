"""The functions a PyTorch split's suffix runs in place of dropout: :func:`fast_dropout` (exact Bernoulli masks
from per-sample streams, :mod:`.masks`), :func:`channel_dropout_conv` (a channel dropout and the convolution
after it from per-channel tables), :func:`repeat_rows` (stacking copies), and the natively-run random functions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mcu.backends.torch.masks import Streams
from mcu.backends.torch.memory import made, reusable_buffer

__all__ = ["Masks", "Unsupported", "channel_dropout_conv", "conv_bn", "fast_dropout", "repeat_rows"]

_CHANNEL_RANK = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}


class Masks:
    """Where one block's dropout masks come from: mask ``j`` of every dropout from stream ``j`` of ``streams``,
    drawn for all ``rows`` examples of the block, dropout after dropout in graph order (``None`` instead of a ``Masks``:
    dropout inactive, used to validate a split).

    When the suffix runs the block's examples in row blocks (:meth:`TorchSplit.row_block`), each dropout's masks
    are drawn for all rows at its first use and kept for the following row blocks: every stream is consumed
    in the same order as without row blocks, so the samples are the same however the rows are grouped."""

    def __init__(self, streams: Streams, rows: int, row_blocks: bool = False,
                 tables: dict | None = None, buffers: dict | None = None) -> None:
        self.streams, self.rows, self.start, self.block = streams, rows, 0, rows
        self._drawn: dict[int, torch.Tensor] | None = {} if row_blocks else None
        self.tables = tables  # channel_dropout_conv's tables, kept across the blocks of a call when given
        self.buffers = buffers  # reusable memory for channel_dropout_conv (see reusable_buffer)

    def take(self, key: int, per_row: tuple[int, ...], keep: float, rows: int, device: torch.device) -> torch.Tensor:
        """``(copies, rows, *per_row)`` uint8 masks of dropout ``key`` for the current rows."""
        if self._drawn is None:
            return self.streams.masks(key, (rows,) + per_row, keep, device)
        if rows != self.block:  # e.g. a dropout after a reshape that changed the rows; validation rejects these
            raise RuntimeError(f"row block of {self.block} examples, but a dropout sees {rows} rows per copy")
        drawn = self._drawn.get(key)
        if drawn is None:
            drawn = self._drawn[key] = self.streams.masks(key, (self.rows,) + per_row, keep, device)
        return drawn[:, self.start:self.start + rows]


def fast_dropout(x: torch.Tensor, module: nn.Module, masks: Masks | None, copies: int, broadcast: bool = False,
                 key: int = 0) -> torch.Tensor:
    """``module(x)`` in training mode on ``copies`` stacked copies, with masks from
    :func:`~mcu.backends.torch.masks.bernoulli_masks`.

    ``x`` holds the ``copies`` stacked copies, or, with ``broadcast=True``, a single copy (a frontier value
    whose only consumers are dropouts): the masks then broadcast against it, so the stacked input is never
    materialised, and the ``1/keep`` scale is applied to the single copy before the masks (the same values
    as scaling after in fp32: ``x * s * 1 == x * 1 * s``, zeros keep their sign; only an ``x / keep`` that
    overflows float range would differ; under bf16 autocast the two orders may round differently). Copy ``j``'s
    mask comes from stream ``j`` of ``masks`` (``key`` names this dropout in it), so a sample's randomness
    depends only on its own stream, never on how samples were grouped into passes. ``masks=None`` means
    dropout inactive (identity), used to validate a split.
    """
    kind = type(module)
    rank = _CHANNEL_RANK.get(kind)
    if rank is not None and x.dim() != rank:  # checked first, so that validating a split catches it
        raise Unsupported(f"{kind.__name__} on a {x.dim()}-D input")
    if masks is None or module.p == 0.0 or module.p == 1.0:
        out = x if masks is None or module.p == 0.0 else made(x * 0.0)
        return repeat_rows(out, copies) if broadcast else out
    rows = x.shape[0] if broadcast else x.shape[0] // copies
    per_row = tuple(x.shape[1:]) if rank is None else (x.shape[1],) + (1,) * (x.dim() - 2)
    keep = 1.0 - module.p
    mask = masks.take(key, per_row, keep, rows, x.device)  # (copies, rows, *per_row) uint8
    if broadcast:
        return made(torch.mul(x.mul(1.0 / keep).unsqueeze(0), mask).flatten(0, 1))
    mask = mask.flatten(0, 1)
    if mask.numel() < x.numel():  # channel masks: scale the small mask, then one pass over x
        return made(x.mul(mask.to(x.dtype).mul_(1.0 / keep)))  # x * (1 * s) == (x * 1) * s
    return made(x.mul(mask).mul_(1.0 / keep))  # uint8 mask promotes to x's dtype


#: A channel dropout + convolution pair is computed from per-channel tables when one example's table takes at
#: most this many bytes (else as dropout, then convolution); row blocks hold tables of about ROW_TABLE_BYTES.
MAX_TABLE_BYTES, ROW_TABLE_BYTES = 8 << 20, 2 << 20


def _conv_output_size(x: torch.Tensor, conv: nn.Module) -> tuple[int, int]:
    sizes = zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return tuple((size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for size, k, stride, pad, dilation in sizes)


def table_bytes(x: torch.Tensor, conv: nn.Module) -> int | None:
    """Bytes of one example's per-channel table for ``conv`` on ``x``, or None when the pair cannot be fused
    (checked on the live module at every call: its attributes may have changed)."""
    if not (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and x.dim() == 4 and math.prod(conv.kernel_size) >= 4):
        return None
    ho, wo = _conv_output_size(x, conv)
    if min(ho, wo) < 1:
        return None
    return (conv.in_channels + 1) * ho * wo * conv.out_channels * conv.weight.element_size()


def foldable(bn: nn.Module | None) -> bool:
    """Whether ``bn`` can be folded into the convolution before it (inference mode, running statistics)."""
    return bn is None or not (bn.training or bn.running_mean is None or bn.running_var is None)


def _folded(conv: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s weight and bias with a :func:`foldable` ``bn`` folded in."""
    if bn is None:
        return conv.weight, conv.bias
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)), shift


def channel_dropout_conv(x: torch.Tensor, dropout: nn.Module, conv: nn.Module, bn: nn.Module | None,
                         masks: Masks | None, copies: int, key: int) -> torch.Tensor:
    """``bn(conv(dropout(x)))`` (``bn`` optional, inference mode) for ``copies`` samples of every example of
    ``x``, a frontier value (one copy), where ``dropout`` is a ``Dropout2d``.

    A channel mask ``m`` zeroes whole input channels, and a convolution is linear, so
    ``conv(x * m / keep) = bias + sum_c m_c * (conv_c(x_c) / keep)``, where ``conv_c`` is the convolution
    restricted to input channel ``c``. The per-channel outputs of each example (its *table*, C x the output
    size) are computed once per block and each sample is a ``(copies, C + 1) @ (C + 1, output)`` product
    with the masks (the extra row adds the bias): for a 3x3 kernel ~9x fewer multiply-adds than convolving
    every sample. The masks are the ones :func:`fast_dropout` would draw (same stream, same order), so
    the samples are the same as unfused, up to floating-point rounding. Pairs whose table would be too large
    (or whose convolution cannot be unfolded) run as dropout, then convolution.
    """
    size = table_bytes(x, conv)
    if not foldable(bn) or size is None or size > MAX_TABLE_BYTES:
        out = conv(fast_dropout(x, dropout, masks, copies, True, key))
        return out if bn is None else bn(out)
    n, c = x.shape[:2]
    o, (kh, kw), dtype = conv.weight.shape[0], conv.weight.shape[2:], conv.weight.dtype
    rate = 0.0 if masks is None else dropout.p
    keep = 1.0 - rate
    ho, wo = _conv_output_size(x, conv)
    device, tables = x.device, None if masks is None else masks.tables
    lower = _autocast_dtype(device.type)
    with torch.autocast(device.type, enabled=False):
        if tables is None or any((key, row) not in tables for row in range(n)):
            weight, bias = _folded(conv, bn)  # only to build tables: cached tables already hold them
            cols = F.unfold(x.to(dtype), (kh, kw), conv.dilation, conv.padding, conv.stride)  # (n, c*k, L)
            scaled = (weight * (1.0 / keep if keep > 0.0 else 0.0)).permute(1, 2, 3, 0).reshape(c, kh * kw, o)
        coefficients = torch.ones((copies, n, c + 1), dtype=dtype, device=device)
        if masks is not None and rate > 0.0:
            coefficients[:, :, :c] = masks.take(key, (c,), keep, n, device)
        out = reusable_buffer(masks, ("out", key), (copies, n, ho * wo * o), lower or dtype, device)
        for row in range(n):
            table = None if tables is None else tables.get((key, row))
            if table is None:
                table = reusable_buffer(masks, ("table", key, row), (c + 1, ho * wo, o), dtype, device)
                torch.matmul(cols[row].view(c, kh * kw, ho * wo).transpose(1, 2), scaled, out=table[:c])
                table[c] = 0.0 if bias is None else bias
                table = table.view(c + 1, ho * wo * o)
                table = made(table if lower is None else table.to(lower))
                if tables is not None:
                    tables[(key, row)] = table
            a = coefficients[:, row] if lower is None else coefficients[:, row].to(lower)
            torch.mm(a, table, out=out[:, row])
    # (copies * n, O, Ho, Wo) in a channels-last layout, as oneDNN would return it
    return made(out.view(copies * n, ho, wo, o).permute(0, 3, 1, 2))


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect for ``device_type`` (None: autocast off); torch < 2.4 spelled it per device."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError):
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def repeat_rows(x: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` stacked copies of ``x`` along the batch axis, keeping a channels-last layout. A plain value
    (e.g. a size read from the input) is the same for every copy and passes through; one that depends on the
    batch size would not, and the split's validation refuses it."""
    if not isinstance(x, torch.Tensor):
        return x
    out = x.repeat(copies, *([1] * (x.dim() - 1)))
    for layout, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dim and x.is_contiguous(memory_format=layout) and not x.is_contiguous():
            return made(out.contiguous(memory_format=layout))
    return made(out)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if isinstance(t, torch.Tensor) and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


class Unsupported(Exception):
    pass


def native_dropout(x: torch.Tensor, module: nn.Module, masks: Masks | None,
                    copies: int) -> torch.Tensor:
    """Dropout kinds without a fast path (AlphaDropout, FeatureAlphaDropout) run natively (global RNG)."""
    return x if masks is None else module(x)


INACTIVE_ARG = {F.scaled_dot_product_attention: ("dropout_p", 4, 0.0),
                 F.multi_head_attention_forward: ("training", None, False)}


def native_call(masks: Masks | None, fn: Callable, *args: object, **kwargs: object) -> object:
    """A random function in the suffix, run natively (global RNG); with ``masks=None`` (validation) its
    inactive form: a dropout returns its input, attention runs without dropout, anything else runs as is
    (and fails validation if it is random)."""
    if masks is not None:
        return fn(*args, **kwargs)
    name = getattr(fn, "__name__", "")
    if "dropout" in name and fn not in INACTIVE_ARG:
        return args[0] if args else kwargs["input"]
    if fn in INACTIVE_ARG:
        key, index, value = INACTIVE_ARG[fn]
        if index is not None and len(args) > index:
            args = args[:index] + (value,) + args[index + 1:]
        else:
            kwargs = {**kwargs, key: value}
    return fn(*args, **kwargs)


def native_method(masks: Masks | None, name: str, self: torch.Tensor, *args: object, **kwargs: object) -> object:
    """A random tensor method in the suffix (e.g. ``bernoulli_`` of a drop-path), run natively."""
    return getattr(self, name)(*args, **kwargs)


def conv_bn(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` for an inference-mode BatchNorm as one convolution with folded weights (one pass over
    the activations instead of two; the same function up to rounding). Folded from the live parameters on
    every call, so nothing is cached or changed. A BatchNorm in training mode (or without running statistics)
    runs as it is."""
    if not foldable(bn):
        return bn(conv(x))
    weight, shift = _folded(conv, bn)
    return made(conv._conv_forward(x, weight, shift))
