"""Structured inputs and outputs: a dict (or tuple) of arrays with one batch axis in, one array out.

Models people run take several inputs (Hugging Face: ``input_ids`` + ``attention_mask``; keras-hub: a dict of
named inputs) and return structures (``ModelOutput``, tuples, dicts). :class:`Batch` carries the inputs
through the strategies as one value — sliced, repeated and sized like a tensor — and :func:`select_output`
picks what to sample from an output. No framework is imported here: the leaves are the backend's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from mcu.errors import InputError

__all__ = ["Batch", "OUTPUT_HELP", "is_structured", "output_keys", "rows", "select_output", "take_rows"]

OUTPUT_HELP = "a key or attribute name (e.g. 'logits'), an integer index, or a callable taking the output"


def is_structured(x: Any) -> bool:
    """A dict of inputs (passed by name) or a tuple of inputs (passed in order)."""
    return isinstance(x, (Mapping, tuple))


def rows(x: Any, argument: str = "x") -> int:
    """The batch size of ``x``: its first axis, or the shared first axis of a dict/tuple of arrays."""
    leaves = list(x.values()) if isinstance(x, Mapping) else list(x) if isinstance(x, tuple) else [x]
    sizes = set()
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) == 0:
            raise InputError(f"{argument}: expected an array or tensor with a batch axis (or a dict/tuple of them), "
                             f"got {type(leaf).__qualname__}.")
        sizes.add(int(shape[0]))
    if len(sizes) != 1:
        raise InputError(f"{argument}: every input must have the same batch axis (first dimension); got sizes "
                         f"{sorted(sizes)}.")
    return sizes.pop()


def take_rows(x: Any, index: Any) -> Any:
    """Rows ``index`` (a slice or an index array) of ``x``, or of every leaf of a dict/tuple of arrays."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(v[index] for v in x)
    return x[index]


class Batch:
    """Inputs sharing the batch axis: ``keys`` (names, or ``None`` for positional inputs) and their leaves.

    Behaves like a tensor where the strategies need it: ``batch[a:b]`` slices every leaf, ``shape`` is
    ``(N, signature)`` (``shape[0]`` the batch size, the whole hashable for caches), ``dtype`` names the leaves'
    dtypes. ``call(model)`` runs ``model(**leaves)`` or ``model(*leaves)``.
    """

    def __init__(self, keys: tuple[str, ...] | None, leaves: tuple[Any, ...]) -> None:
        self.keys, self.leaves = keys, leaves

    @classmethod
    def convert(cls, x: Any, leaf: Callable[[Any, str], Any]) -> "Batch":
        """``x`` (a dict or tuple) with every leaf converted by ``leaf(value, argument_name)``; checks that the
        leaves share the batch axis."""
        if isinstance(x, Mapping):
            if not x:
                raise InputError("x: got an empty dict; expected at least one named input.")
            bad = [k for k in x if not isinstance(k, str)]
            if bad:
                raise InputError(f"x: dict keys must be the model's argument names (strings), got {bad[0]!r}.")
            keys: tuple[str, ...] | None = tuple(x)
            values = [x[k] for k in keys]
            names = [f"x[{k!r}]" for k in keys]
        else:
            if not x:
                raise InputError("x: got an empty tuple; expected at least one input.")
            keys, values = None, list(x)
            names = [f"x[{i}]" for i in range(len(values))]
        leaves = tuple(leaf(v, name) for v, name in zip(values, names))
        sizes = {name: (int(t.shape[0]) if len(t.shape) else None) for name, t in zip(names, leaves)}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise InputError(f"x: every input must have the same batch axis (first dimension); got "
                             f"{', '.join(f'{k}: {v}' for k, v in sizes.items())}.")
        return cls(keys, leaves)

    def map(self, fn: Callable[[Any], Any]) -> "Batch":
        return Batch(self.keys, tuple(fn(t) for t in self.leaves))

    def __getitem__(self, index: slice) -> "Batch":
        if not isinstance(index, slice):
            raise TypeError("a Batch is indexed by row slices only")
        return self.map(lambda t: t[index])

    @property
    def shape(self) -> tuple:
        names = self.keys or tuple(range(len(self.leaves)))
        return (int(self.leaves[0].shape[0]), tuple((k, tuple(t.shape[1:])) for k, t in zip(names, self.leaves)))

    @property
    def dtype(self) -> str:
        return "structured(" + ", ".join(str(t.dtype) for t in self.leaves) + ")"

    def call(self, model: Any) -> Any:
        if self.keys is None:
            return model(*self.leaves)
        return model(**dict(zip(self.keys, self.leaves)))

    def as_input(self) -> Any:
        """The leaves as a dict or tuple (for frameworks whose models take one structured argument)."""
        return self.leaves if self.keys is None else dict(zip(self.keys, self.leaves))


def output_keys(out: Any) -> list:
    """What ``output=`` could select from ``out``: keys of a mapping (or ``ModelOutput``), indices of a
    sequence, public fields of another object."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        try:
            return list(out.keys())
        except TypeError:
            pass
    if isinstance(out, (tuple, list)):
        return list(range(len(out)))
    return [k for k in vars(out) if not k.startswith("_")] if hasattr(out, "__dict__") else []


def select_output(out: Any, output: Any, is_tensor: Callable[[Any], bool], what: str = "tensor") -> Any:
    """The tensor ``output`` names in the forward pass's result ``out`` (``output=None``: ``out`` must be one
    tensor). Errors list what is available."""
    if output is None:
        if is_tensor(out):
            return out
        raise InputError(
            f"output: the forward pass returned a {type(out).__qualname__}, not one {what}; pass output= "
            f"({OUTPUT_HELP}); available: {output_keys(out)}.")
    if callable(output):
        chosen = output(out)
    elif isinstance(output, bool) or not isinstance(output, (str, int)):
        raise InputError(f"output: expected {OUTPUT_HELP}, got {output!r}.")
    else:
        chosen = _pick(out, output)
    if not is_tensor(chosen):
        raise InputError(f"output: {output!r} selected a {type(chosen).__qualname__}, expected one {what}.")
    return chosen


def _pick(out: Any, key: str | int) -> Any:
    try:
        if isinstance(key, str) and not isinstance(out, Mapping) and not hasattr(out, "keys"):
            return getattr(out, key)
        chosen = out[key]
    except (KeyError, IndexError, AttributeError, TypeError):
        chosen = None
    if chosen is None:
        raise InputError(f"output: {key!r} is not in the forward pass's {type(out).__qualname__}; available: "
                         f"{output_keys(out)}.")
    return chosen
