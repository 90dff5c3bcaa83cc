"""Sampling without touching the user's model: a *twin* that shares its parameters but has its own flags.

MC dropout needs every stochastic site of the model on (``nn.Dropout*`` modules, ``F.dropout`` calls gated by
``self.training``, attention dropout in ``nn.MultiheadAttention`` / ``scaled_dot_product_attention`` / Hugging
Face attention, ``nn.LSTM(dropout=)``, drop-path ...) and everything else in inference mode. Flipping training
flags on the user's modules would race with every other thread using the model, so sampling runs on a twin:

- a structural copy of the module tree (``copy`` of each ``nn.Module`` object, children twinned recursively)
  whose ``_parameters``, ``_buffers`` and hook dictionaries *are* the user's (no tensor is copied; a replaced
  parameter is seen at once), and whose ``training`` flags are its own and never change after it is built;
- in ``"dropout"`` mode the flags come from a probe: one forward pass of a twin with every module in training
  mode (layers with running statistics excepted) records, under a thread-local ``TorchFunctionMode``, each
  random operation and the innermost module running when it was called. Those modules and their ancestors
  (whose own flags may gate a fast path that skips dropout, as ``nn.TransformerEncoderLayer``'s does) are in
  training mode; every other module, and every BatchNorm/InstanceNorm with running statistics, is in eval
  mode. A second probe of the final twin must see the same random operations: a site the twin cannot switch
  on (e.g. a module reached through a plain attribute, not a registered child) is reported by name.
- in ``"training"`` mode every module is in training mode (the literal recipe); modules with running
  statistics get copies of their buffers, so their updates never reach the user's model.

Twins are cached weakly per model and rebuilt when the model's structure or a module attribute changes
(:func:`fingerprint`). TorchScript modules keep their flags in C++ objects that a shallow copy shares, so a
model containing one is twinned by a deep copy (its weights are copied once; rebuilt when a tensor changes).

The probe also checks that the model's randomness is *per example*: each random operation's tensor must grow
with the batch (a dropout mask on a weight matrix, or a single random number per pass, would be shared by the
stacked copies that the vectorized and prefix strategies run in one pass: ``stacking_problem``).
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mcu.backends.torch.attention import ATTENTION_OP, stream_attention
from mcu.backends.torch.masks import Streams, bernoulli_masks, keep_bits
from mcu.structured import Batch

__all__ = ["Twin", "RANDOM_FUNCTIONS", "fingerprint", "is_random_call", "snapshot", "twin_of"]

#: functional dropouts and whether their ``training`` argument defaults to True
_F_DROPOUTS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True, F.alpha_dropout: False,
               F.feature_alpha_dropout: False}
_TORCH_DROPOUTS = {torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}
#: Functions and tensor methods that always draw random numbers (by name: tensor methods reach a
#: ``TorchFunctionMode`` as method descriptors).
RANDOM_FUNCTIONS = frozenset({
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    "normal", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "poisson",
    "multinomial", "rrelu", "rrelu_", "gumbel_softmax", "native_dropout",
})
_RNN_OPS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def is_random_call(func: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """Whether calling ``func(*args, **kwargs)`` draws random numbers, and the tensor whose size tells whether
    the randomness is per example (the input of a dropout, the query of an attention, the result of a
    generator: ``None`` then). Works on traced ``torch.fx`` arguments too (constants are plain values)."""
    if func in _F_DROPOUTS:
        p, training = _arg(args, kwargs, 1, "p", 0.5), _arg(args, kwargs, 2, "training", _F_DROPOUTS[func])
        return _positive(p) and training is not False, _arg(args, kwargs, 0, "input")
    if func in _TORCH_DROPOUTS:
        p, train = _arg(args, kwargs, 1, "p", 0.0), _arg(args, kwargs, 2, "train", False)
        return _positive(p) and train is not False, _arg(args, kwargs, 0, "input")
    if func is F.scaled_dot_product_attention:
        return _positive(_arg(args, kwargs, 4, "dropout_p", 0.0)), _arg(args, kwargs, 0, "query")
    if func is F.multi_head_attention_forward:
        p, training = _arg(args, kwargs, 10, "dropout_p", 0.0), kwargs.get("training", True)
        return _positive(p) and training is not False, _arg(args, kwargs, 0, "query")
    name = getattr(func, "__name__", None)
    if name in _RNN_OPS and getattr(func, "__module__", None) in (None, "torch", "torch._C._VariableFunctions"):
        # _VF.lstm(input, hx, weights, bias, layers, dropout, train, bidirectional, batch_first) or, packed,
        # _VF.lstm(data, batch_sizes, hx, weights, bias, layers, dropout, train, bidirectional)
        packed = len(args) > 2 and not isinstance(args[2], list)
        offset = 1 if packed else 0
        if len(args) < 7 + offset:
            return False, None
        layers, p, train = args[4 + offset], args[5 + offset], args[6 + offset]
        return _positive(p) and train is not False and isinstance(layers, int) and layers > 1, args[0]
    if name in RANDOM_FUNCTIONS:
        if name in ("rrelu", "rrelu_"):
            return _arg(args, kwargs, 3, "training", False) is True, _arg(args, kwargs, 0, "input")
        return True, None
    return False, None


def _positive(p: Any) -> bool:
    """``p > 0`` for a plain number; an unknown (traced) rate counts as positive."""
    return not isinstance(p, (int, float)) or p > 0.0


def _has_running_stats(module: nn.Module) -> bool:
    """Layers that normalise with statistics kept from training (BatchNorm, InstanceNorm with tracked stats)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return bool(module.track_running_stats)
    return "running_mean" in module._buffers or "running_var" in module._buffers


def _scripted(model: nn.Module) -> bool:
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


_INTERNALS = frozenset(vars(nn.Module())) | {"training"}


def fingerprint(model: nn.Module) -> tuple:
    """What a twin copied from ``model`` and must be rebuilt for when it changes: the module tree (identities)
    and each module's own attributes (numbers, strings and containers of them by value, other objects by
    identity). Parameters, buffers and hooks are shared with the twin, so they are not part of it, except
    for TorchScript models, whose twin copies the tensors (their identity and version counter count)."""
    parts: list = []
    for name, module in model.named_modules(remove_duplicate=False):
        parts.append((name, id(module)))
        for key, value in vars(module).items():
            if key not in _INTERNALS:
                parts.append((key, snapshot(value, 2)))
    if _scripted(model):
        parts.extend((id(t), t._version) for t in list(model.parameters()) + list(model.buffers()))
    return tuple(parts)


def snapshot(value: object, levels: int, objects: bool = False, depth: int = 0) -> object:
    """``value`` as a cache compares it: numbers and strings by value, tuples and lists (up to 64 items) by value
    ``levels`` deep, with ``objects`` also dicts and plain objects' attributes (what a trace bakes in: e.g. a
    config object mutated in place); anything else, and big containers, by identity."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, (tuple, list, dict)) and len(value) > 64:
        return (type(value), id(value), len(value))
    if depth < levels and isinstance(value, (tuple, list)):
        return (type(value), tuple(snapshot(v, levels, objects, depth + 1) for v in value))
    if objects and depth < levels and isinstance(value, dict):
        return (dict, tuple((snapshot(k, levels, objects, depth + 1), snapshot(v, levels, objects, depth + 1))
                            for k, v in value.items()))
    if objects and depth < levels and not isinstance(value, (torch.Tensor, nn.Module, type)) \
            and hasattr(value, "__dict__") and not callable(value):
        return (type(value), id(value), snapshot(vars(value), levels, objects, depth + 1))
    return (type(value), id(value))


@dataclass
class Twin:
    """A model's twin for one mode: ``module`` runs the passes; the rest describes what the probe saw."""

    module: nn.Module
    mode: str
    #: twin modules in training mode because they run a random operation (not their ancestors)
    stochastic: frozenset = frozenset()
    #: every twin module in training mode (the stochastic ones and their ancestors)
    training: frozenset = frozenset()
    #: qualified names of the modules running random operations, with the operations
    sites: tuple[tuple[str, str], ...] = ()
    #: why stacked copies of the batch in one pass would share randomness (None: they would not)
    stacking_problem: str | None = None
    #: a twin that runs every module in eval mode (dropout off), sharing the same tensors, for validating splits
    inference: nn.Module | None = None
    #: whether some random operation draws from torch's global generators even when the call has its own
    #: stream (functional, attention and RNN dropout, AlphaDropout, ...): seeding then needs them
    global_rng: bool = True
    _state: tuple = field(default=(), repr=False)


#: The random stream of the sampling call running in this thread: dropout modules of a twin draw their masks
#: from it (packed random bits, :func:`mcu.backends.torch.masks.bernoulli_masks`), so a call neither needs nor
#: disturbs torch's global generators, and a mask costs a fraction of a ``bernoulli_`` draw per element.
_CALL = threading.local()
#: The batched input rank of the channel dropouts (other ranks draw from the global generator, as native).
_CHANNEL_RANK = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
_OWN_MASKS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def call_streams(streams: Streams | None, generator: torch.Generator | None = None) -> Any:
    """Context manager: ``streams`` (one stream: :class:`~mcu.backends.torch.masks.Streams` of one seed) and
    ``generator`` (seeded calls: small masks draw from it) are this thread's sampling sources in the block."""
    return _CallStreams(streams, generator)


class _CallStreams:
    def __init__(self, streams: Streams | None, generator: torch.Generator | None) -> None:
        self.sources = (streams, generator)

    def __enter__(self) -> None:
        self.previous = (getattr(_CALL, "streams", None), getattr(_CALL, "generator", None))
        _CALL.streams, _CALL.generator = self.sources

    def __exit__(self, *exc: Any) -> None:
        _CALL.streams, _CALL.generator = self.previous


#: Masks of at least this many elements come from the call's stream (a fixed cost per mask, higher for rates
#: that need the exact tie step, against a cost per element for ``bernoulli_``); smaller ones from
#: ``bernoulli_`` with the call's generator (seeded) or natively (unseeded).
STREAM_MIN_ELEMENTS = {True: 4096, False: 32768}  # keyed by "the keep rate is dyadic"

def _call_sources() -> tuple[Streams | None, torch.Generator | None, dict[bool, int]]:
    """This thread's sampling sources and the stream's minimum mask size (for attention dropout)."""
    return getattr(_CALL, "streams", None), getattr(_CALL, "generator", None), STREAM_MIN_ELEMENTS


def _own_masks(module: nn.Module) -> bool:
    """A dropout module whose masks a twin draws from the call's stream."""
    return type(module) in _OWN_MASKS and 0.0 < module.p < 1.0


def _stream_dropout(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module.forward`` in training mode, with masks from the call's stream when it has one (the distribution
    of ``F.dropout``: exact Bernoulli(1 - p) per element, or per channel, scaled by 1 / (1 - p))."""
    native = type(module).forward
    rank = _CHANNEL_RANK.get(type(module))

    def forward(x: torch.Tensor) -> torch.Tensor:
        streams, generator = getattr(_CALL, "streams", None), getattr(_CALL, "generator", None)
        if (streams is None and generator is None) or not module.training or (rank is not None and x.dim() != rank):
            return native(module, x)
        keep = 1.0 - module.p
        shape = tuple(x.shape) if rank is None else tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
        if streams is not None and math.prod(shape) >= STREAM_MIN_ELEMENTS[keep_bits(keep)[0] > 0]:
            mask = bernoulli_masks(shape, keep, streams, x.device)[0]
        elif generator is not None:
            mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep, generator=generator)
        else:
            return native(module, x)
        if rank is not None or mask.dtype != torch.uint8:  # small (channel) masks: scale them, then one pass
            return x.mul(mask.to(x.dtype).mul_(1.0 / keep))
        return x.mul(mask).mul_(1.0 / keep)

    return forward


class _Probe(TorchFunctionMode):
    """Records random operations (with the innermost module running) in the current thread while active."""

    def __init__(self, stack: list) -> None:
        super().__init__()
        self.stack = stack
        self.calls: list[tuple[Any, str, int | None]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        random, tensor = is_random_call(func, args, kwargs)
        out = func(*args, **kwargs)
        if random:
            sized = tensor if isinstance(tensor, torch.Tensor) else out
            numel = sized.numel() if isinstance(sized, torch.Tensor) else None
            self.calls.append((self.stack[-1] if self.stack else None, getattr(func, "__name__", str(func)), numel))
        return out


def _copy_tree(model: nn.Module, flag: Callable[[nn.Module], bool], *, probe_stack: list | None = None,
               own_buffers: bool = False) -> tuple[nn.Module, dict[int, nn.Module]]:
    """A structural copy of ``model``: new module objects (shared children stay shared), the user's parameter,
    buffer and hook dictionaries, training flags from ``flag(original)``. ``probe_stack``: wrap each module's
    forward to keep the stack of running modules (original objects) in that list. ``own_buffers``: modules with
    running statistics get copies of their buffers. Returns the copy and a map from id(original) to copy."""
    memo: dict[int, nn.Module] = {}

    def twin(module: nn.Module) -> nn.Module:
        done = memo.get(id(module))
        if done is not None:
            return done
        new = copy.copy(module)  # shallow: the same _parameters/_buffers/hook dicts
        memo[id(module)] = new
        new.__dict__["_modules"] = type(module._modules)(
            (name, None if child is None else twin(child)) for name, child in module._modules.items())
        new.__dict__["training"] = flag(module)
        if own_buffers and _has_running_stats(module):
            new.__dict__["_buffers"] = type(module._buffers)(
                (k, None if v is None else v.detach().clone()) for k, v in module._buffers.items())
        if probe_stack is not None:
            new.__dict__["forward"] = _tracked(new, module, probe_stack)
        return new

    return twin(model), memo


def _tracked(new: nn.Module, original: nn.Module, stack: list) -> Callable[..., Any]:
    forward = type(new).forward

    def tracked_forward(*args: Any, **kwargs: Any) -> Any:
        stack.append(original)
        try:
            return forward(new, *args, **kwargs)
        finally:
            stack.pop()

    return tracked_forward


def _probe(model: nn.Module, flag: Callable[[nn.Module], bool], run: Callable[[nn.Module, Any], Any],
           inputs: Iterable[Any]) -> list[list[tuple[Any, str, int | None]]]:
    """The random operations of one pass per input, on a copy of ``model`` with flags from ``flag``. Global
    random state is restored afterwards."""
    stack: list = []
    probe_twin, _ = _copy_tree(model, flag, probe_stack=stack, own_buffers=True)
    passes = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for x in inputs:
            with _Probe(stack) as recorder:
                run(probe_twin, x)
            passes.append(recorder.calls)
            stack.clear()
    return passes


def _names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name or type(model).__name__)
    return names


def _ancestors(model: nn.Module, targets: set[int]) -> set[int]:
    """ids of every module that has one of ``targets`` among its descendants (a target included)."""
    found: set[int] = set()

    def visit(module: nn.Module) -> bool:
        hit = id(module) in targets
        for child in module._modules.values():
            if child is not None and visit(child):
                hit = True
        if hit:
            found.add(id(module))
        return hit

    visit(model)
    return found


def _stacking_problem(one: list, two: list, names: dict[int, str]) -> str | None:
    """Random operations whose tensor does not double when the batch doubles."""
    if [c[:2] for c in one] != [c[:2] for c in two]:
        return "the model runs different random operations for different batch sizes"
    shared = sorted({f"{names.get(id(m), '?')} ({op})" for (m, op, a), (_, _, b) in zip(one, two)
                     if a is None or b is None or b != 2 * a})
    if shared:
        return ("some random values are shared by the whole batch, not drawn per example: " + ", ".join(shared))
    return None


def build(model: nn.Module, mode: str, x: Any, run: Callable[[nn.Module, Any], Any],
          no_dropout: Callable[[str], Exception], warn: Callable[[str], None]) -> Twin:
    """The twin of ``model`` for ``mode`` (see the module docstring). ``x``: a batch (at least one example)
    for the probe; ``run(module, rows)`` runs one pass; ``no_dropout(msg)`` makes the error for a model
    without any random operation; ``warn(msg)`` reports sites the twin could not switch on."""
    if _scripted(model):
        return _scripted_twin(model, mode, x, run, no_dropout)
    one = x[:2]  # two rows: enough for layers that need more than one example in training mode
    two = one.map(lambda t: torch.cat([t, t])) if isinstance(one, Batch) else torch.cat([one, one])
    state = fingerprint(model)
    names = _names(model)
    if mode == "training":
        module, memo = _copy_tree(model, lambda m: True, own_buffers=True)
        passes = _probe(model, lambda m: True, run, (one, two))
        if not passes[0]:
            raise no_dropout(_no_sites(model))
        return Twin(module, mode, frozenset(memo.values()), frozenset(memo.values()),
                    _sites(passes[0], names), _stacking_problem(passes[0], passes[1], names), None, state)

    def all_train(m: nn.Module) -> bool:
        return not _has_running_stats(m)

    passes = _probe(model, all_train, run, (one, two))
    calls = passes[0]
    if not calls:
        raise no_dropout(_no_sites(model))
    stochastic = {id(m) for m, _, _ in calls if m is not None}
    train = {i for i in _ancestors(model, stochastic)}

    def final(m: nn.Module) -> bool:
        return id(m) in train and not _has_running_stats(m)

    check = _probe(model, final, run, (one,))[0]
    missing = _missing(calls, check, names)
    if len(check) == 0:
        raise no_dropout(f"model: {type(model).__qualname__} runs random operations only with the whole model in "
                         f"training mode, and mcu could not switch them on separately ({missing}); use "
                         "mode='training' or make the dropout a registered submodule.")
    if missing:
        warn(f"model: some dropout sites of {type(model).__qualname__} stay off during sampling because mcu "
             f"cannot switch them on without changing the model: {missing}. Samples underestimate the spread "
             "that model.train() would give; make these modules registered submodules.")
    module, memo = _copy_tree(model, final)
    inference, _ = _copy_tree(model, lambda m: False)
    own = {i for i in stochastic if _own_masks(memo[i])}
    for i in own:
        memo[i].__dict__["forward"] = _stream_dropout(memo[i])
    for i in {id(m) for m, op, _ in calls if op == ATTENTION_OP and id(m) in memo} - own:
        if "forward" not in memo[i].__dict__:  # an instance's own forward (a wrapper's hook) stays as it is
            memo[i].__dict__["forward"] = stream_attention(memo[i], _call_sources)
    return Twin(module, mode, frozenset(memo[i] for i in stochastic if i in memo),
                frozenset(memo[i] for i in train if i in memo), _sites(calls, names),
                _stacking_problem(passes[0], passes[1], names), inference,
                any(id(m) not in own for m, _, _ in calls), state)


def _sites(calls: list, names: dict[int, str]) -> tuple[tuple[str, str], ...]:
    seen: dict[tuple[str, str], None] = {}
    for module, op, _ in calls:
        seen[(names.get(id(module), "?"), op)] = None
    return tuple(seen)


def _missing(expected: list, got: list, names: dict[int, str]) -> str:
    from collections import Counter

    lost = Counter((id(m), op) for m, op, _ in expected) - Counter((id(m), op) for m, op, _ in got)
    modules = {id(m): m for m, _, _ in expected}
    return ", ".join(f"{names.get(i, '?')} ({type(modules[i]).__name__}: {op})" for (i, op) in sorted(lost))


def _no_sites(model: nn.Module) -> str:
    zero = [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    extra = (f" Its dropout modules ({', '.join(zero[:5])}) have rate 0, which is not dropout." if zero else "")
    return (f"model: {type(model).__qualname__} has no dropout module (nor functional, attention or RNN dropout, "
            f"nor any other random operation) that runs in training mode, so every MC sample would be identical; "
            f"expected dropout with a rate > 0 (nn.Dropout*, F.dropout, attention or RNN dropout).{extra}")


def _scripted_twin(model: nn.Module, mode: str, x: Any, run: Callable[[nn.Module, Any], Any],
                   no_dropout: Callable[[str], Exception]) -> Twin:
    """TorchScript: flags live in shared C++ objects, so the twin is a deep copy (weights copied once)."""
    twin = copy.deepcopy(model)
    if mode == "training":
        twin.train()
    else:
        twin.eval()
        for m in twin.modules():
            if getattr(m, "original_name", None) in _SCRIPTED_DROPOUTS and float(getattr(m, "p", 0.0)) > 0.0:
                m.train()
    stochastic = frozenset(m for m in twin.modules() if m.training)
    if not any(getattr(m, "original_name", None) in _SCRIPTED_DROPOUTS and float(getattr(m, "p", 0.0)) > 0.0
               for m in twin.modules()):
        raise no_dropout(f"model: the TorchScript model {type(model).__qualname__} has no dropout module with a "
                         "rate > 0 (mcu sees dropout inside TorchScript only as Dropout modules).")
    inference = copy.deepcopy(twin).eval()
    return Twin(twin, mode, stochastic, stochastic, (), None, inference, fingerprint(model))


_SCRIPTED_DROPOUTS = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                                "FeatureAlphaDropout"})


class TwinCache:
    """Twins per model and mode, cached weakly (a twin holds no reference to its model), rebuilt when the
    model's :func:`fingerprint` changes. Thread-safe: one build per model at a time."""

    def __init__(self) -> None:
        self._twins: "weakref.WeakKeyDictionary[nn.Module, dict[str, Twin]]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._building: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, mode: str, make: Callable[[], Twin]) -> Twin:
        state = fingerprint(model)
        with self._lock:
            found = self._twins.get(model, {}).get(mode)
            if found is not None and found._state == state:
                return found
            building = self._building.setdefault(model, threading.Lock())
        with building:
            with self._lock:
                found = self._twins.get(model, {}).get(mode)
            if found is not None and found._state == fingerprint(model):
                return found
            twin = make()
            with self._lock:
                self._twins.setdefault(model, {})[mode] = twin
            return twin


def twin_of(cache: TwinCache, model: nn.Module, mode: str, make: Callable[[], Twin]) -> Twin:
    return cache.get(model, mode, make)
