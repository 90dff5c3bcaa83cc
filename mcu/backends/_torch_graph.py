"""PyTorch prefix caching and cheap exact dropout masks, on a ``torch.fx`` trace of the user's model.

The traced graph is cut in two: the *prefix* (every node not downstream of a dropout module — a deterministic
function of the input, run once on the N examples) and the *suffix* (the rest, run on k stacked copies of the
prefix's outputs). In the suffix, ``Dropout``/``Dropout1d/2d/3d`` modules are replaced by :func:`fast_dropout`,
whose Bernoulli masks come from per-sample counter-based random streams (:mod:`mcu.backends._torch_rng`)
instead of per-element draws. The graph is traced from the model's sampling twin
(:mod:`mcu.backends._torch_twin`), so every ``self.training`` branch is taken as in MC mode and the graphs call
the twin's modules (the user's parameters, the twin's flags). Every random operation counts as stochastic:
dropout modules, leaf modules in training mode (``nn.MultiheadAttention``, ``nn.LSTM``,
``nn.TransformerEncoderLayer``, ...) and random functions (``F.dropout``, attention with ``dropout_p > 0``,
``torch.bernoulli`` ...); those without a fast path run natively in the suffix (global generator). Every split is
validated once against the model with dropout inactive (graphs bound to the twin whose modules are all in eval
mode, random functions inactive), on two stacked copies, so a batch-size constant captured by the trace cannot
silently give wrong results.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mcu.backends._torch_rng import Streams
from mcu.backends._torch_twin import RANDOM_FUNCTIONS, Twin, is_random_call

__all__ = ["Masks", "TorchSplit", "channel_dropout_conv", "fast_dropout", "repeat_rows", "split_model"]

_FAST = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CHANNEL_RANK = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}


_meters = threading.local()


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


def _made(t: torch.Tensor) -> torch.Tensor:
    for callback in getattr(_meters, "active", ()):
        callback(t)
    return t


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
        self.buffers = buffers  # reusable memory for channel_dropout_conv (see _buffer)

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
    :func:`~mcu.backends._torch_rng.bernoulli_masks`.

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
        raise _Unsupported(f"{kind.__name__} on a {x.dim()}-D input")
    if masks is None or module.p == 0.0 or module.p == 1.0:
        out = x if masks is None or module.p == 0.0 else _made(x * 0.0)
        return repeat_rows(out, copies) if broadcast else out
    rows = x.shape[0] if broadcast else x.shape[0] // copies
    per_row = tuple(x.shape[1:]) if rank is None else (x.shape[1],) + (1,) * (x.dim() - 2)
    keep = 1.0 - module.p
    mask = masks.take(key, per_row, keep, rows, x.device)  # (copies, rows, *per_row) uint8
    if broadcast:
        return _made(torch.mul(x.mul(1.0 / keep).unsqueeze(0), mask).flatten(0, 1))
    mask = mask.flatten(0, 1)
    if mask.numel() < x.numel():  # channel masks: scale the small mask, then one pass over x
        return _made(x.mul(mask.to(x.dtype).mul_(1.0 / keep)))  # x * (1 * s) == (x * 1) * s
    return _made(x.mul(mask).mul_(1.0 / keep))  # uint8 mask promotes to x's dtype


#: A channel dropout + convolution pair is computed from per-channel tables when one example's table takes at
#: most this many bytes (else as dropout, then convolution); row blocks hold tables of about ROW_TABLE_BYTES.
MAX_TABLE_BYTES, ROW_TABLE_BYTES = 8 << 20, 2 << 20


def _conv_output_size(x: torch.Tensor, conv: nn.Module) -> tuple[int, int]:
    sizes = zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return tuple((size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for size, k, stride, pad, dilation in sizes)


def _table_bytes(x: torch.Tensor, conv: nn.Module) -> int | None:
    """Bytes of one example's per-channel table for ``conv`` on ``x``, or None when the pair cannot be fused
    (checked on the live module at every call: its attributes may have changed)."""
    if not (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and x.dim() == 4 and math.prod(conv.kernel_size) >= 4):
        return None
    ho, wo = _conv_output_size(x, conv)
    if min(ho, wo) < 1:
        return None
    return (conv.in_channels + 1) * ho * wo * conv.out_channels * conv.weight.element_size()


def _foldable(bn: nn.Module | None) -> bool:
    """Whether ``bn`` can be folded into the convolution before it (inference mode, running statistics)."""
    return bn is None or not (bn.training or bn.running_mean is None or bn.running_var is None)


def _folded(conv: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s weight and bias with a :func:`_foldable` ``bn`` folded in."""
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
    table_bytes = _table_bytes(x, conv)
    if not _foldable(bn) or table_bytes is None or table_bytes > MAX_TABLE_BYTES:
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
        out = _buffer(masks, ("out", key), (copies, n, ho * wo * o), lower or dtype, device)
        for row in range(n):
            table = None if tables is None else tables.get((key, row))
            if table is None:
                table = _buffer(masks, ("table", key, row), (c + 1, ho * wo, o), dtype, device)
                torch.matmul(cols[row].view(c, kh * kw, ho * wo).transpose(1, 2), scaled, out=table[:c])
                table[c] = 0.0 if bias is None else bias
                table = table.view(c + 1, ho * wo * o)
                table = _made(table if lower is None else table.to(lower))
                if tables is not None:
                    tables[(key, row)] = table
            a = coefficients[:, row] if lower is None else coefficients[:, row].to(lower)
            torch.mm(a, table, out=out[:, row])
    # (copies * n, O, Ho, Wo) in a channels-last layout, as oneDNN would return it
    return _made(out.view(copies * n, ho, wo, o).permute(0, 3, 1, 2))


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect for ``device_type`` (None: autocast off); torch < 2.4 spelled it per device."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError):
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _buffer(masks: Masks | None, role: tuple, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for ``role``, made from this thread's buffer of an earlier block or call when
    nothing references that buffer any more (else a new one, kept for next time). Freshly allocated buffers of
    a few MB cost page faults with glibc's default malloc settings: ~840 per 100-sample call of the benchmark
    CNN at N=1, +1.2 ms (~35%), measured here; torch's CPU allocator does not cache."""
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


def repeat_rows(x: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` stacked copies of ``x`` along the batch axis, keeping a channels-last layout. A plain value
    (e.g. a size read from the input) is the same for every copy and passes through; one that depends on the
    batch size would not, and the split's validation refuses it."""
    if not isinstance(x, torch.Tensor):
        return x
    out = x.repeat(copies, *([1] * (x.dim() - 1)))
    for layout, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dim and x.is_contiguous(memory_format=layout) and not x.is_contiguous():
            return _made(out.contiguous(memory_format=layout))
    return _made(out)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if isinstance(t, torch.Tensor) and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


class _Unsupported(Exception):
    pass


def _native_dropout(x: torch.Tensor, module: nn.Module, masks: Masks | None,
                    copies: int) -> torch.Tensor:
    """Dropout kinds without a fast path (AlphaDropout, FeatureAlphaDropout) run natively (global RNG)."""
    return x if masks is None else module(x)


_INACTIVE_ARG = {F.scaled_dot_product_attention: ("dropout_p", 4, 0.0),
                 F.multi_head_attention_forward: ("training", None, False)}


def _native_call(masks: Masks | None, fn: Callable, *args: object, **kwargs: object) -> object:
    """A random function in the suffix, run natively (global RNG); with ``masks=None`` (validation) its
    inactive form: a dropout returns its input, attention runs without dropout, anything else runs as is
    (and fails validation if it is random)."""
    if masks is not None:
        return fn(*args, **kwargs)
    name = getattr(fn, "__name__", "")
    if "dropout" in name and fn not in _INACTIVE_ARG:
        return args[0] if args else kwargs["input"]
    if fn in _INACTIVE_ARG:
        key, index, value = _INACTIVE_ARG[fn]
        if index is not None and len(args) > index:
            args = args[:index] + (value,) + args[index + 1:]
        else:
            kwargs = {**kwargs, key: value}
    return fn(*args, **kwargs)


def _native_method(masks: Masks | None, name: str, self: torch.Tensor, *args: object, **kwargs: object) -> object:
    """A random tensor method in the suffix (e.g. ``bernoulli_`` of a drop-path), run natively."""
    return getattr(self, name)(*args, **kwargs)


def _random_node(node: torch.fx.Node, modules: dict[str, nn.Module], training: frozenset) -> bool:
    """Whether ``node`` draws random numbers in MC mode: a leaf module of the twin in training mode (dropout,
    attention, RNN, ...), a random function or a random tensor method."""
    if node.op == "call_module":
        return modules.get(node.target) in training
    if node.op == "call_function":
        return is_random_call(node.target, node.args, node.kwargs)[0]
    if node.op == "call_method":
        return node.target in RANDOM_FUNCTIONS
    return False


@dataclass
class TorchSplit:
    """A validated prefix/suffix pair. ``suffix(frontier, streams)`` takes the frontier of the ``N`` examples
    (not repeated: ``repeats_frontier``) and one random stream per copy; ``streams=None`` disables dropout."""

    repeats_frontier = True  # the suffix stacks the copies itself (broadcasting into dropouts where it can)

    prefix_module: torch.fx.GraphModule
    suffix_module: torch.fx.GraphModule
    n_prefix_nodes: int
    n_suffix_nodes: int
    native_rng: bool  # True when some dropout still draws from the global RNG (not thread-deterministic)
    #: (frontier index, convolution) of each channel dropout + convolution pair run by channel_dropout_conv
    fused: tuple[tuple[int, nn.Module], ...] = ()
    #: the same split without fused pairs (for few copies per pass the tables do not pay; ``auto`` probes both)
    unfused: "TorchSplit | None" = None
    #: per thread: buffers the fused pairs reuse across blocks and calls when all examples run at once (freed
    #: with the split)
    _buffers: threading.local = field(default_factory=threading.local, init=False, repr=False, compare=False)
    #: the graphs bound to the all-eval twin, for validation (see _inactive)
    _inactive: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def prefix(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frontier values for ``x``. Image-like tensors come back channels-last: the same values in the
        memory layout oneDNN convolutions and pooling run fastest on (measured ~2x on this project's CPU)."""
        return [_channels_last(t) for t in self.prefix_module(x)]

    def row_block(self, frontier: list[torch.Tensor]) -> int | None:
        """Examples per suffix run, or None for all at once. Fused pairs build a table per example (C x their
        output): the suffix then runs on row blocks whose tables take about ROW_TABLE_BYTES, each block's
        samples reusing the tables, so the tables' memory does not grow with the number of examples (the
        masks of the later dropouts and the results, drawn and kept for all examples, still do)."""
        if not self.fused:
            return None
        sizes = [_table_bytes(frontier[i], conv) for i, conv in self.fused]
        sizes = [size for size in sizes if size is not None and size <= MAX_TABLE_BYTES]
        if not sizes:
            return None
        n = int(frontier[self.fused[0][0]].shape[0])
        step = max(1, ROW_TABLE_BYTES // sum(sizes))
        return step if step < n else None

    @staticmethod
    def rows(frontier: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
        """Examples ``start:stop`` of the frontier (plain values, e.g. sizes read from the input, as they are)."""
        return [f[start:stop] if isinstance(f, torch.Tensor) else f for f in frontier]

    def suffix(self, frontier: list[torch.Tensor], streams: Streams | None,
               copies: int | None = None, tables: dict | None = None, row_block: int | None = None) -> torch.Tensor:
        """``len(streams)`` samples (or ``copies`` inactive copies) stacked along the batch axis. ``tables``:
        a dict the caller keeps for all blocks of one frontier, so that fused pairs build their tables once
        (used when all examples run at once; with row blocks each block builds its own). ``row_block``: force
        row blocks of that many examples, 0 for all at once (validation)."""
        copies = len(streams) if streams is not None else copies
        if copies is None:
            raise ValueError("suffix: give streams or copies")
        step = self.row_block(frontier) if row_block is None else (row_block or None)
        with torch.no_grad():  # also in worker threads, where grad mode is not inherited
            if step is None:
                buffers = self._buffers.__dict__ if self.fused else None
                masks = None if streams is None else Masks(streams, 0, tables=tables, buffers=buffers)
                return self.suffix_module(*frontier, masks, copies)
            # Row blocks allocate fresh buffers: keeping them gained nothing measurable here (N=64 benchmark CNN)
            # and held ~7 MB more at the peak.
            n = int(frontier[self.fused[0][0]].shape[0])
            masks = None if streams is None else Masks(streams, n, row_blocks=True)
            result = None
            for start in range(0, n, step):
                if masks is not None:
                    masks.start, masks.block = start, min(step, n - start)
                out = self.suffix_module(*self.rows(frontier, start, start + step), masks, copies)
                out = out.view((copies, -1) + tuple(out.shape[1:]))
                # filled in place: small per-row-block results kept in a list, allocated between the row blocks'
                # large buffers, fragmented glibc's heap (+100 MB over one N=64 call of the benchmark CNN, at random)
                if result is None:
                    result = out.new_empty((copies, n) + tuple(out.shape[2:]))
                result[:, start:start + out.shape[1]] = out
                del out
            return result.flatten(0, 1)

    @property
    def description(self) -> str:
        fused = f"; {len(self.fused)} channel dropout + convolution pair(s) from per-channel tables" \
            if self.fused else ""
        return f"{self.n_prefix_nodes} graph nodes run once, {self.n_suffix_nodes} per sample{fused}"


class _ThreadTracer(torch.fx.Tracer):
    """``torch.fx`` tracing patches ``nn.Module.__call__`` and ``__getattr__`` process-wide while it runs: this
    tracer lets other threads' module calls and attribute reads through untouched (they would otherwise see
    proxies, or fail), and traces run one at a time (nested patches restored out of order would stay)."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__()
        self._owner = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> object:
        if threading.get_ident() != self._owner:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: object, parameter_proxy_cache: dict) -> object:
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    with _ThreadTracer._lock:
        tracer = _ThreadTracer()
        graph = tracer.trace(module)
    return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)


def _build(twin: Twin, dropout_types: tuple[type, ...], fuse: bool = True) -> TorchSplit:
    traced = _trace(twin.module)
    graph = traced.graph
    modules = dict(traced.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _Unsupported(f"the model takes {len(placeholders)} inputs; prefix caching supports one")

    def is_dropout(node: torch.fx.Node) -> bool:
        module = modules.get(node.target) if node.op == "call_module" else None
        return module in twin.training and (isinstance(module, dropout_types) or scripted_dropout(module))

    def is_random(node: torch.fx.Node) -> bool:
        return _random_node(node, modules, twin.training)

    called = {modules[n.target] for n in graph.nodes if n.op == "call_module"}
    covered = {id(m) for leaf in called for m in leaf.modules()}
    hidden = [type(m).__name__ for m in twin.training
              if (isinstance(m, dropout_types) or scripted_dropout(m)) and id(m) not in covered]
    if hidden:  # e.g. a TorchScript dropout, traced through: it would run once, in the prefix
        raise _Unsupported(f"dropout modules not visible as module calls to torch.fx: {hidden}")
    stochastic: set[torch.fx.Node] = set()
    batched: set[torch.fx.Node] = set(placeholders)  # depends on the input (so has N rows, or is a size)
    for node in graph.nodes:
        if is_random(node) or any(arg in stochastic for arg in node.all_input_nodes):
            stochastic.add(node)
        elif any(arg in batched for arg in node.all_input_nodes):
            batched.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    if output not in stochastic:
        raise _Unsupported("the output does not depend on any dropout")
    # Batched deterministic values the suffix needs are computed once and passed in; constants (parameters,
    # buffers, anything not derived from the input) are simply recomputed inside the suffix.
    frontier = [n for n in graph.nodes if n in batched and n not in stochastic and any(u in stochastic for u in n.users)]

    prefix = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node not in stochastic and node.op != "output":
            env[node] = prefix.node_copy(node, lambda n: env[n])
    prefix.output(tuple(env[n] for n in frontier))

    suffix = torch.fx.Graph()
    env2: dict[torch.fx.Node, torch.fx.Node] = {n: suffix.placeholder(f"frontier_{i}") for i, n in enumerate(frontier)}
    masks = suffix.placeholder("masks")
    copies = suffix.placeholder("copies")

    def is_fast(node: torch.fx.Node) -> bool:
        return is_dropout(node) and type(modules[node.target]) in _FAST and _unhooked(modules[node.target])

    # A frontier value read only by fast dropouts is broadcast into their masks; other readers get k copies.
    single = {f: env2[f] for f in frontier}
    for f in frontier:
        if any(not (is_fast(u) and u.args[0] is f) for u in f.users if u in stochastic):
            env2[f] = suffix.call_function(repeat_rows, (single[f], copies))
    # A Dropout2d on a frontier value, read only by a convolution: computed together (channel_dropout_conv).
    pairs = {}  # dropout node -> its convolution node
    for node in graph.nodes:
        if fuse and is_fast(node) and node.args[0] in single and (conv := _fusable(node, modules)) is not None:
            pairs[node] = conv
    keys = {node: i for i, node in enumerate(n for n in graph.nodes if is_fast(n))}
    native = False
    for node in graph.nodes:
        if node in single or (node not in stochastic and node in batched):
            continue
        if node in pairs:  # at the dropout's place in the graph: its masks are drawn in the unfused order
            conv, bn = pairs[node], _folds_into(pairs[node], modules)
            args = (single[node.args[0]], suffix.get_attr(node.target), suffix.get_attr(conv.target),
                    None if bn is None else suffix.get_attr(bn.target), masks, copies, keys[node])
            env2[conv] = suffix.call_function(channel_dropout_conv, args)
            if bn is not None:
                env2[bn] = env2[conv]
            continue
        if is_dropout(node):
            module = suffix.get_attr(node.target)
            source = node.args[0]
            if is_fast(node):
                broadcast = source in single
                args = (single[source] if broadcast else env2[source], module, masks, copies, broadcast, keys[node])
                env2[node] = suffix.call_function(fast_dropout, args)
            else:
                native = True
                env2[node] = suffix.call_function(_native_dropout, (env2[source], module, masks, copies))
        elif node in env2:
            continue  # a BatchNorm already folded into the convolution before it, or a fused pair's convolution
        elif node.op in ("call_function", "call_method") and is_random(node):
            native = True
            args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: env2[n])
            if node.op == "call_function":
                env2[node] = suffix.call_function(_native_call, (masks, node.target, *args), kwargs)
            else:
                env2[node] = suffix.call_function(_native_method, (masks, node.target, *args), kwargs)
        elif node.op == "call_module" and is_random(node):
            native = True  # a leaf module with dropout inside (attention, RNN, transformer layer): runs as it is
            env2[node] = suffix.node_copy(node, lambda n: env2[n])
        elif (bn := _folds_into(node, modules)) is not None:
            args = (env2[node.args[0]], suffix.get_attr(node.target), suffix.get_attr(bn.target))
            env2[node] = env2[bn] = suffix.call_function(conv_bn, args)
        elif _relu_in_place(node, modules, stochastic):
            env2[node] = suffix.call_function(torch.relu_, (env2[node.args[0]],))
        else:
            env2[node] = suffix.node_copy(node, lambda n: env2[n])
    fused = tuple((frontier.index(d.args[0]), modules[conv.target]) for d, conv in pairs.items())
    n_pre = sum(1 for n in graph.nodes if n not in stochastic and n.op not in ("placeholder", "output"))
    n_suf = sum(1 for n in stochastic if n.op != "output")
    return TorchSplit(
        torch.fx.GraphModule(traced, prefix), torch.fx.GraphModule(traced, suffix), n_pre, n_suf, native, fused
    )


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _folds_into(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The BatchNorm node that ``node`` (a convolution) feeds and nothing else reads, if any."""
    if node.op != "call_module" or not isinstance(modules.get(node.target), _CONVS) or len(node.users) != 1:
        return None
    (user,) = node.users
    ok = (user.op == "call_module" and isinstance(modules.get(user.target), _NORMS) and len(user.args) == 1
          and not user.kwargs and len(node.args) == 1 and not node.kwargs
          and _unhooked(modules[node.target], modules[user.target]))
    return user if ok else None


def _fusable(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The convolution node that ``node`` (a ``Dropout2d`` call) feeds and nothing else reads, when the pair can
    run as :func:`channel_dropout_conv` (a plain 2-D convolution with a kernel of at least 4 taps, no hooks)."""
    if type(modules[node.target]) is not nn.Dropout2d or len(node.users) != 1:
        return None
    (user,) = node.users
    conv = modules.get(user.target) if user.op == "call_module" else None
    ok = (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
          and isinstance(conv.padding, tuple) and math.prod(conv.kernel_size) >= 4
          and len(user.args) == 1 and not user.kwargs and _unhooked(modules[node.target], conv))
    return user if ok else None


_DROPOUT_NAMES = frozenset(cls.__name__ for cls in (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout))


def scripted_dropout(module: nn.Module) -> bool:
    """A dropout module compiled by ``torch.jit.script`` (e.g. a loaded TorchScript model): its class is
    ``RecursiveScriptModule``, its ``original_name`` the dropout class's; it honours ``training`` as usual.
    In a split it runs natively (a stochastic node, drawing from the global generator)."""
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) in _DROPOUT_NAMES


def _unhooked(*modules: nn.Module) -> bool:
    """No forward hooks on these modules (a rewrite that does not call a module would skip its hooks)."""
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


_FRESH = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _relu_in_place(node: torch.fx.Node, modules: dict[str, nn.Module], stochastic: set) -> bool:
    """A ``ReLU`` module whose input is a new tensor (a convolution's, linear layer's or BatchNorm's output,
    in the suffix) read by nothing else: it can overwrite its input instead of allocating another one."""
    if node.op != "call_module" or type(modules.get(node.target)) is not nn.ReLU or len(node.args) != 1 \
            or not _unhooked(modules[node.target]):
        return False
    source = node.args[0]
    return (isinstance(source, torch.fx.Node) and source in stochastic and len(source.users) == 1
            and source.op == "call_module" and isinstance(modules.get(source.target), _FRESH)
            and _unhooked(modules[source.target]))  # a hook may have kept the tensor ReLU would overwrite


def conv_bn(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` for an inference-mode BatchNorm as one convolution with folded weights (one pass over
    the activations instead of two; the same function up to rounding). Folded from the live parameters on
    every call, so nothing is cached or changed. A BatchNorm in training mode (or without running statistics)
    runs as it is."""
    if not _foldable(bn):
        return bn(conv(x))
    weight, shift = _folded(conv, bn)
    return _made(conv._conv_forward(x, weight, shift))


def _inactive(split: TorchSplit, twin: Twin) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The split's graphs bound to the twin whose modules are all in eval mode: dropout inactive everywhere (with
    no masks, fast dropouts and random functions are inactive too). Built once per split."""
    if split._inactive is None:
        root = twin.inference
        split._inactive = (torch.fx.GraphModule(root, copy.deepcopy(split.prefix_module.graph)),
                           torch.fx.GraphModule(root, copy.deepcopy(split.suffix_module.graph)))
    return split._inactive


def _validate(split: TorchSplit, twin: Twin, x: torch.Tensor) -> None:
    """Two stacked copies through the split must equal the model's own output (dropout inactive). Checked in
    the model's own precision (autocast off): a bf16 call must not reject a split for bf16 rounding. Nothing
    is switched on or off: the inactive graphs run on the twin's all-eval sibling."""
    prefix, suffix = _inactive(split, twin)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        reference = twin.inference(x)
        frontier = [_channels_last(t) for t in prefix(x)]
        out = suffix(*frontier, None, 2)
    if not isinstance(out, torch.Tensor) or out.shape != (2 * x.shape[0],) + reference.shape[1:]:
        raise _Unsupported("the split graph does not reproduce the output shape for stacked copies")
    n = x.shape[0]
    for copy_ in (out[:n], out[n:]):
        if not torch.allclose(copy_.float(), reference.float(), rtol=1e-4, atol=1e-5):
            raise _Unsupported("the split graph does not reproduce the model's output for stacked copies")
    if split.fused and split.native_rng:  # row blocks could not be checked without touching the global RNG
        raise _Unsupported("fused pairs need every dropout's masks from the per-sample streams")
    if split.fused and n > 1:
        # Row blocks (one example at a time) must give what all examples at once give, with real masks: a
        # dropout whose rows a reshape changed, or a batch-size value in the frontier, would not.
        def streams() -> Streams:
            return Streams((11, 12), x.device)

        frontier = split.prefix(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            together = split.suffix(frontier, streams(), row_block=0)
            blocked = split.suffix(frontier, streams(), row_block=1)
        if together.shape != blocked.shape or not torch.allclose(together.float(), blocked.float(), rtol=1e-4,
                                                                  atol=1e-5):
            raise _Unsupported("running the examples in row blocks changes the samples")


def still_valid(split: TorchSplit, twin: Twin, x: torch.Tensor) -> bool:
    """Whether a cached split still reproduces the model (attributes the trace baked in may have changed)."""
    try:
        _validate(split, twin, x[: min(int(x.shape[0]), 2)])
    except Exception:  # noqa: BLE001 - any failure means: rebuild
        return False
    return True


#: the sampling twin's own bookkeeping (see mcu.backends.torch) is not an attribute a trace can bake in
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training", "_mcu_twin"}


def attribute_state(model: nn.Module) -> tuple:
    """What a ``torch.fx`` trace may have baked in, cheap to compare: every submodule's own attributes (not
    ``nn.Module``'s internals; private ones included), and which parameter and buffer objects it holds (a
    replaced buffer or parameter is a new object). A cached split is re-validated when this changes.
    Numbers, strings, containers and plain objects are compared by value (a few levels deep), tensors and
    other objects by identity."""
    attributes = tuple((name, key, _plain(value)) for name, module in model.named_modules()
                       for key, value in vars(module).items() if key not in _MODULE_INTERNALS)
    tensors = tuple((name, id(t)) for name, t in model.named_parameters(remove_duplicate=False)) + tuple(
        (name, id(t)) for name, t in model.named_buffers(remove_duplicate=False))
    return attributes + tensors


def _plain(value: object, depth: int = 0) -> object:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, (tuple, list, dict)) and len(value) > 64:  # big containers: identity and size only
        return (type(value), id(value), len(value))
    if depth < 3 and isinstance(value, (tuple, list)):
        return (type(value), tuple(_plain(v, depth + 1) for v in value))
    if depth < 3 and isinstance(value, dict):
        return (dict, tuple((_plain(k, depth + 1), _plain(v, depth + 1)) for k, v in value.items()))
    if depth < 3 and not isinstance(value, (torch.Tensor, nn.Module, type)) and hasattr(value, "__dict__") \
            and not callable(value):
        return (type(value), id(value), _plain(vars(value), depth + 1))  # e.g. a config object, mutated
    return (type(value), id(value))


def split_model(twin: Twin, x: torch.Tensor, dropout_types: tuple[type, ...]) -> tuple[TorchSplit | None, str]:
    """Trace and split the sampling twin's module. Returns ``(split, why)`` or ``(None, why not)``. A split
    with fused channel dropout + convolution pairs that fails validation is retried without them."""
    why = ""
    rows = x[: min(int(x.shape[0]), 3)]
    for fuse in (True, False):
        split = None
        try:
            split = _build(twin, dropout_types, fuse)
            _validate(split, twin, rows)
            if split.fused:
                try:
                    plain = _build(twin, dropout_types, fuse=False)
                    _validate(plain, twin, rows)
                    split.unfused = plain
                except Exception:  # noqa: BLE001 - the fused split stands on its own
                    split.unfused = None
            return split, split.description
        except _Unsupported as exc:
            why = str(exc)
        except Exception as exc:  # tracing fails on data-dependent control flow and other dynamic code
            why = f"torch.fx could not trace or run the model ({type(exc).__name__}: {str(exc)[:200]})"
        if split is None or not split.fused:
            break
    return None, why
