"""PyTorch prefix caching and cheap exact dropout masks, on a ``torch.fx`` trace of the user's model.

The traced graph is cut in two: the *prefix* (every node not downstream of a dropout module — a deterministic
function of the input, run once on the N examples) and the *suffix* (the rest, run on k stacked copies of the
prefix's outputs). In the suffix, ``Dropout``/``Dropout1d/2d/3d`` modules are replaced by :func:`fast_dropout`,
whose Bernoulli masks come from per-sample counter-based random streams (:mod:`mcu.backends.torch.masks`)
instead of per-element draws. The graph is traced from the model's sampling twin
(:mod:`mcu.backends.torch.twin`), so every ``self.training`` branch is taken as in MC mode and the graphs call
the twin's modules (the user's parameters, the twin's flags). Every random operation counts as stochastic:
dropout modules, leaf modules in training mode (``nn.MultiheadAttention``, ``nn.LSTM``,
``nn.TransformerEncoderLayer``, ...) and random functions (``F.dropout``, attention with ``dropout_p > 0``,
``torch.bernoulli`` ...); those without a fast path run natively in the suffix (global generator). Every split is
validated once against the model with dropout inactive (graphs bound to the twin whose modules are all in eval
mode, random functions inactive), on two stacked copies, so a batch-size constant captured by the trace cannot
silently give wrong results.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
from torch import nn

from mcu.backends.torch import kernels
from mcu.backends.torch.kernels import (
    Masks,
    Unsupported,
    channel_dropout_conv,
    channels_last,
    conv_bn,
    fast_dropout,
    native_call,
    native_dropout,
    native_method,
    repeat_rows,
    table_bytes,
)
from mcu.backends.torch.masks import Streams
from mcu.backends.torch.twin import RANDOM_FUNCTIONS, Twin, is_random_call, snapshot

__all__ = ["TorchSplit", "attribute_state", "split_model", "still_valid"]

_FAST = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CHANNEL_RANK = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}


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
        memory layout oneDNN convolutions and pooling run fastest on."""
        return [channels_last(t) for t in self.prefix_module(x)]

    def row_block(self, frontier: list[torch.Tensor]) -> int | None:
        """Examples per suffix run, or None for all at once. Fused pairs build a table per example (C x their
        output): the suffix then runs on row blocks whose tables take about kernels.ROW_TABLE_BYTES, each block's
        samples reusing the tables, so the tables' memory does not grow with the number of examples (the
        masks of the later dropouts and the results, drawn and kept for all examples, still do)."""
        if not self.fused:
            return None
        sizes = [table_bytes(frontier[i], conv) for i, conv in self.fused]
        sizes = [size for size in sizes if size is not None and size <= kernels.MAX_TABLE_BYTES]
        if not sizes:
            return None
        n = int(frontier[self.fused[0][0]].shape[0])
        step = max(1, kernels.ROW_TABLE_BYTES // sum(sizes))
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
            # Row blocks allocate fresh buffers (keeping them would hold more memory at the peak).
            n = int(frontier[self.fused[0][0]].shape[0])
            masks = None if streams is None else Masks(streams, n, row_blocks=True)
            result = None
            for start in range(0, n, step):
                if masks is not None:
                    masks.start, masks.block = start, min(step, n - start)
                out = self.suffix_module(*self.rows(frontier, start, start + step), masks, copies)
                out = out.view((copies, -1) + tuple(out.shape[1:]))
                # filled in place: small per-row-block results kept in a list, allocated between the row blocks'
                # large buffers, would fragment the C heap
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
        raise Unsupported(f"the model takes {len(placeholders)} inputs; prefix caching supports one")

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
        raise Unsupported(f"dropout modules not visible as module calls to torch.fx: {hidden}")
    stochastic: set[torch.fx.Node] = set()
    batched: set[torch.fx.Node] = set(placeholders)  # depends on the input (so has N rows, or is a size)
    for node in graph.nodes:
        if is_random(node) or any(arg in stochastic for arg in node.all_input_nodes):
            stochastic.add(node)
        elif any(arg in batched for arg in node.all_input_nodes):
            batched.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    if output not in stochastic:
        raise Unsupported("the output does not depend on any dropout")
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
                env2[node] = suffix.call_function(native_dropout, (env2[source], module, masks, copies))
        elif node in env2:
            continue  # a BatchNorm already folded into the convolution before it, or a fused pair's convolution
        elif node.op in ("call_function", "call_method") and is_random(node):
            native = True
            args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: env2[n])
            if node.op == "call_function":
                env2[node] = suffix.call_function(native_call, (masks, node.target, *args), kwargs)
            else:
                env2[node] = suffix.call_function(native_method, (masks, node.target, *args), kwargs)
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
        frontier = [channels_last(t) for t in prefix(x)]
        out = suffix(*frontier, None, 2)
    if not isinstance(out, torch.Tensor) or out.shape != (2 * x.shape[0],) + reference.shape[1:]:
        raise Unsupported("the split graph does not reproduce the output shape for stacked copies")
    n = x.shape[0]
    for copy_ in (out[:n], out[n:]):
        if not torch.allclose(copy_.float(), reference.float(), rtol=1e-4, atol=1e-5):
            raise Unsupported("the split graph does not reproduce the model's output for stacked copies")
    if split.fused and split.native_rng:  # row blocks could not be checked without touching the global RNG
        raise Unsupported("fused pairs need every dropout's masks from the per-sample streams")
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
            raise Unsupported("running the examples in row blocks changes the samples")


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
    attributes = tuple((name, key, snapshot(value, 3, objects=True)) for name, module in model.named_modules()
                       for key, value in vars(module).items() if key not in _MODULE_INTERNALS)
    tensors = tuple((name, id(t)) for name, t in model.named_parameters(remove_duplicate=False)) + tuple(
        (name, id(t)) for name, t in model.named_buffers(remove_duplicate=False))
    return attributes + tensors


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
        except Unsupported as exc:
            why = str(exc)
        except Exception as exc:  # tracing fails on data-dependent control flow and other dynamic code
            why = f"torch.fx could not trace or run the model ({type(exc).__name__}: {str(exc)[:200]})"
        if split is None or not split.fused:
            break
    return None, why
