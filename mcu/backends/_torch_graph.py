"""PyTorch prefix caching and cheap exact dropout masks, on a ``torch.fx`` trace of the user's model.

The traced graph is cut in two: the *prefix* (every node not downstream of a dropout module — a deterministic
function of the input, run once on the N examples) and the *suffix* (the rest, run on k stacked copies of the
prefix's outputs). In the suffix, ``Dropout``/``Dropout1d/2d/3d`` modules are replaced by :func:`fast_dropout`,
whose Bernoulli masks come from bulk random bytes instead of per-element draws. Both graphs call the user's
own module objects (no copy, nothing changed); tracing happens inside MC mode so that any ``self.training``
branch is taken as in MC mode. Every split is validated once against the model itself with dropout inactive,
on two stacked copies, so a batch-size constant captured by the trace cannot silently give wrong results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.fx
from torch import nn

__all__ = ["TorchSplit", "bernoulli_mask", "fast_dropout", "split_model"]

_FAST = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CHANNEL_RANK = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
_WORD = 1 << 32


def _random_words(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` independent uniform 32-bit words (as int64 in [0, 2**32)). randint over exactly 2**32 values is
    unbiased (torch reduces a 64-bit draw modulo a power of two)."""
    words = torch.randint(-(1 << 31), 1 << 31, (n,), generator=generator, dtype=torch.int32, device=device)
    return words.to(torch.int64) + (1 << 31)


def _uniform_words(n: int, bits: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` independent uniform words of 8 bits (uint8) or 16 bits (int16, i.e. offset by -2**15).

    Drawn as 63-bit integers (``random_`` on int64 is uniform on [0, 2**63): a 64-bit draw modulo a power of
    two) of which the low 56 bits (7 bytes) or 48 bits (3 words) are used; the cost is per drawn integer, so
    packing several words into each draw is what makes this cheap. Returned flat, possibly a strided view.
    """
    per, dtype, width = (7, torch.uint8, 8) if bits == 8 else (3, torch.int16, 4)
    rows = -(-n // per)
    raw = torch.empty(rows, dtype=torch.int64, device=device).random_(generator=generator)
    return raw.view(dtype).view(rows, width)[:, :per]


def bernoulli_mask(shape: tuple[int, ...], keep: float, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """A uint8 mask of independent Bernoulli(``keep``) draws, exact for ``keep`` as a float64.

    Compares one uniform word per element with the leading bits of ``keep``'s binary expansion: 8-bit words
    when ``keep`` is a multiple of 1/256 (0.5, 0.75, 0.9375, ...: a tie then means the draw equals ``keep``
    and is dropped, so the comparison is exact), otherwise 16-bit words, and only the ~1/65536 ties draw more
    bits (two 32-bit words). ``keep`` is expanded to 80 bits, which represents every float64 in [2**-27, 1]
    exactly; below that the error is under 2**-80.
    """
    n = math.prod(shape)
    q = int(Fraction(keep) * (1 << 80))
    if q % (1 << 72) == 0:
        words = _uniform_words(n, 8, generator, device)
        return (words < (q >> 72)).reshape(-1)[:n].view(torch.uint8).view(shape)
    top, mid, low = q >> 64, (q >> 32) & (_WORD - 1), q & (_WORD - 1)
    first = _uniform_words(n, 16, generator, device)  # uniform over [-2**15, 2**15): shift the threshold
    mask = (first < top - (1 << 15)).reshape(-1)[:n].view(torch.uint8)
    if mid == 0 and low == 0:
        return mask.view(shape)  # a tie equals keep's expansion exactly: U >= keep, dropped
    ties = (first == top - (1 << 15)).reshape(-1)[:n]
    if not bool(ties.any()):
        return mask.view(shape)
    ties = ties.nonzero().squeeze(1)
    for threshold in (mid, low):
        words = _random_words(ties.numel(), generator, device)
        mask[ties[words < threshold]] = 1
        ties = ties[words == threshold]
        if ties.numel() == 0:
            break
    return mask.view(shape)  # remaining ties: the draw equals keep's expansion, so U >= keep: dropped


def fast_dropout(x: torch.Tensor, module: nn.Module, generators: list[torch.Generator] | None) -> torch.Tensor:
    """``module(x)`` in training mode, with masks from :func:`bernoulli_mask`; same distribution.

    ``x`` holds ``k = len(generators)`` stacked copies; copy ``j``'s mask comes from ``generators[j]``, so a
    sample's randomness depends only on its own generator, never on how samples were grouped into passes.
    ``generators=None`` means dropout inactive (identity), used to validate a split.
    """
    kind = type(module)
    rank = _CHANNEL_RANK.get(kind)
    if rank is not None and x.dim() != rank:  # checked first, so that validating a split catches it
        raise _Unsupported(f"{kind.__name__} on a {x.dim()}-D input")
    if generators is None or module.p == 0.0:
        return x
    if module.p == 1.0:
        return x * 0.0
    rows = x.shape[0] // len(generators)
    mask_shape = (rows,) + (tuple(x.shape[1:]) if rank is None else (x.shape[1],) + (1,) * (x.dim() - 2))
    keep = 1.0 - module.p
    masks = [bernoulli_mask(mask_shape, keep, g, x.device) for g in generators]
    mask = masks[0] if len(masks) == 1 else torch.cat(masks)
    return x.mul(mask).mul_(1.0 / keep)  # uint8 mask promotes to x's dtype; one new tensor


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if isinstance(t, torch.Tensor) and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


class _Unsupported(Exception):
    pass


def _native_dropout(x: torch.Tensor, module: nn.Module, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Dropout kinds without a fast path (AlphaDropout, FeatureAlphaDropout) run natively (global RNG)."""
    return x if generators is None else module(x)


@dataclass
class TorchSplit:
    """A validated prefix/suffix pair. ``suffix(frontier, generators)``: one generator per stacked copy;
    ``None`` disables dropout."""

    prefix_module: torch.fx.GraphModule
    suffix_module: torch.fx.GraphModule
    n_prefix_nodes: int
    n_suffix_nodes: int
    native_rng: bool  # True when some dropout still draws from the global RNG (not thread-deterministic)

    def prefix(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frontier values for ``x``. Image-like tensors come back channels-last: the same values in the
        memory layout oneDNN convolutions and pooling run fastest on (measured ~2x on this project's CPU)."""
        return [_channels_last(t) for t in self.prefix_module(x)]

    def suffix(self, frontier: list[torch.Tensor], generators: list[torch.Generator] | None) -> torch.Tensor:
        with torch.no_grad():  # also in worker threads, where grad mode is not inherited
            return self.suffix_module(*frontier, generators)

    @property
    def description(self) -> str:
        return f"{self.n_prefix_nodes} graph nodes run once, {self.n_suffix_nodes} per sample"


def _build(model: nn.Module, dropout_types: tuple[type, ...]) -> TorchSplit:
    traced = torch.fx.symbolic_trace(model)
    graph = traced.graph
    modules = dict(traced.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _Unsupported(f"the model takes {len(placeholders)} inputs; prefix caching supports one")

    def is_dropout(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules.get(node.target), dropout_types)

    stochastic: set[torch.fx.Node] = set()
    batched: set[torch.fx.Node] = set(placeholders)  # depends on the input (so has N rows, or is a size)
    for node in graph.nodes:
        if is_dropout(node) or any(arg in stochastic for arg in node.all_input_nodes):
            stochastic.add(node)
        elif any(arg in batched for arg in node.all_input_nodes):
            batched.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    if output not in stochastic:
        raise _Unsupported("the output does not depend on any dropout module")
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
    generator = suffix.placeholder("generators")
    native = False
    for node in graph.nodes:
        if node in env2 or (node not in stochastic and node in batched):
            continue
        if is_dropout(node):
            module = suffix.get_attr(node.target)
            fast = type(modules[node.target]) in _FAST
            native = native or not fast
            env2[node] = suffix.call_function(
                fast_dropout if fast else _native_dropout, (env2[node.args[0]], module, generator)
            )
        else:
            env2[node] = suffix.node_copy(node, lambda n: env2[n])
    n_pre = sum(1 for n in graph.nodes if n not in stochastic and n.op not in ("placeholder", "output"))
    n_suf = sum(1 for n in stochastic if n.op != "output")
    return TorchSplit(
        torch.fx.GraphModule(traced, prefix), torch.fx.GraphModule(traced, suffix), n_pre, n_suf, native
    )


def _validate(split: TorchSplit, model: nn.Module, dropouts: list[nn.Module], x: torch.Tensor) -> None:
    """Two stacked copies through the split must equal the model's own output (dropout inactive)."""
    flags = [m.training for m in dropouts]
    try:
        for m in dropouts:
            m.training = False
        reference = model(x)
        frontier = split.prefix(x)
        out = split.suffix([f.repeat(2, *([1] * (f.dim() - 1))) for f in frontier], None)
    finally:
        for m, flag in zip(dropouts, flags):
            m.training = flag
    if not isinstance(out, torch.Tensor) or out.shape != (2 * x.shape[0],) + reference.shape[1:]:
        raise _Unsupported("the split graph does not reproduce the output shape for stacked copies")
    n = x.shape[0]
    for copy in (out[:n], out[n:]):
        if not torch.allclose(copy.float(), reference.float(), rtol=1e-4, atol=1e-5):
            raise _Unsupported("the split graph does not reproduce the model's output for stacked copies")


def still_valid(split: TorchSplit, model: nn.Module, dropouts: list[nn.Module], x: torch.Tensor) -> bool:
    """Whether a cached split still reproduces the model (attributes the trace baked in may have changed)."""
    try:
        _validate(split, model, dropouts, x[: min(int(x.shape[0]), 2)])
    except Exception:  # noqa: BLE001 - any failure means: rebuild
        return False
    return True


def split_model(model: nn.Module, dropouts: list[nn.Module], x: torch.Tensor,
                dropout_types: tuple[type, ...]) -> tuple[TorchSplit | None, str]:
    """Trace and split ``model`` (call inside MC mode). Returns ``(split, why)`` or ``(None, why not)``."""
    try:
        split = _build(model, dropout_types)
        _validate(split, model, dropouts, x[: min(int(x.shape[0]), 3)])
    except _Unsupported as exc:
        return None, str(exc)
    except Exception as exc:  # tracing fails on data-dependent control flow and other dynamic code
        return None, f"torch.fx could not trace or run the model ({type(exc).__name__}: {str(exc)[:200]})"
    return split, split.description
