"""The pool as a list of row sources with known lengths, and the worker-side reader of any rows of it.

A pool is cut into *sources* whose row counts the driver learns without reading the data: a numpy array (one
source in Ray's object store), the files of a Parquet dataset (counts from the file footers), or the blocks of
a Ray Dataset (held in the object store). The global index of a row is its position across the sources in
order; a worker asked for global rows ``[lo, hi)`` reads only the sources (and Parquet row groups) that hold
them. Nothing here imports a deep-learning framework; pyarrow and ray are imported inside the functions.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mcu.errors import InputError

__all__ = ["Pool", "PoolReader", "features_from_arrow", "features_from_numpy", "list_parquet", "structured_leaves"]


@dataclass
class Pool:
    """What workers need to read the pool: sources in order and how to turn rows into model inputs.

    ``sources`` are dicts ``{"kind": "numpy", "ref": ObjectRef, "rows": n}`` (the ref resolves to an array, a
    dict of column arrays, or the leaves of a structured pool) or ``{"kind": "parquet", "path": str,
    "filesystem": pyarrow FileSystem, "rows": n}``. ``structure`` is set for a structured pool (model inputs
    passed by name or in order, see :mod:`mcu.structured`): the input names of a dict pool, or ``None`` keys
    with the number of inputs of a tuple pool; its source resolves to the tuple of leaves. ``column`` may be
    a mapping ``{input name: column}``: named inputs read from columns (of Parquet files or a Ray Dataset).
    """

    sources: list[dict[str, Any]]
    column: str | list[str] | dict[str, str] | None = None
    shape: tuple[int, ...] | None = None
    id_column: str | None = None
    structure: tuple[tuple[str, ...] | None, int] | None = None
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.column, dict):  # named inputs, each read from its column
            if self.shape is not None:
                raise InputError("shape: only for one input column; with column={name: column} every column holds "
                                 "examples of their own shape.")
            self.structure = (tuple(self.column), len(self.column))
        rows = np.array([s["rows"] for s in self.sources], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])


def structured_leaves(data: Any, argument: str) -> tuple[tuple[str, ...] | None, tuple[np.ndarray, ...]]:
    """``(keys, leaves)`` of a dict pool (``keys``: the input names) or a tuple pool (``keys``: ``None``).

    Every leaf becomes a numpy array without copying when it already is one (or a CPU tensor sharing its
    memory) and must have the same first-axis length; names are strings.
    """
    if isinstance(data, Mapping):
        if not data:
            raise InputError(f"{argument}: got an empty dict; expected at least one named input.")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise InputError(f"{argument}: dict keys must be the model's argument names (strings), got {bad[0]!r}.")
        keys: tuple[str, ...] | None = tuple(data)
        named = [(f"{argument}[{k!r}]", data[k]) for k in data]
    else:
        if not data:
            raise InputError(f"{argument}: got an empty tuple; expected at least one input.")
        keys, named = None, [(f"{argument}[{i}]", v) for i, v in enumerate(data)]
    leaves = []
    for name, value in named:
        if not hasattr(value, "__array__") or getattr(value, "shape", None) is None:
            raise InputError(f"{name}: expected a numpy array (or a CPU tensor) with a batch axis first, got "
                             f"{type(value).__qualname__}.")
        array = np.asarray(value)
        if array.ndim == 0:
            raise InputError(f"{name}: expected an array with a batch axis first, got a 0-d array.")
        if array.dtype.kind not in "biufc":
            raise InputError(f"{name}: expected an array of numbers (bool, int, float or complex), got dtype "
                             f"{array.dtype}.")
        leaves.append(array)
    sizes = {name: len(leaf) for (name, _), leaf in zip(named, leaves)}
    if len(set(sizes.values())) != 1:
        raise InputError(f"{argument}: every input must have the same batch axis (first dimension); got "
                         f"{', '.join(f'{k}: {v}' for k, v in sizes.items())}.")
    return keys, tuple(leaves)


def check_shape(shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        out = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InputError(
            f"shape: expected a tuple of positive ints (the shape of one example), got {shape!r}."
        ) from None
    if not out or any(d < 1 for d in out) or any(isinstance(d, bool) for d in shape):
        raise InputError(f"shape: expected a tuple of positive ints (the shape of one example), got {shape!r}.")
    return out


def _reshape(x: np.ndarray, shape: tuple[int, ...] | None, where: str) -> np.ndarray:
    if shape is None:
        return x
    per_item = int(np.prod(x.shape[1:], dtype=np.int64))
    if per_item != int(np.prod(shape)):
        raise InputError(
            f"shape: {shape} holds {int(np.prod(shape))} values per example, but {where} has {per_item} "
            f"(per-example shape {x.shape[1:]})."
        )
    return x.reshape((len(x), *shape))


def features_from_numpy(value: Any, column: str | list[str] | None, shape: tuple[int, ...] | None) -> np.ndarray:
    """Model inputs ``(n, ...)`` from an array or a dict of column arrays (a Ray Data numpy batch)."""
    if isinstance(value, dict):
        if isinstance(column, list):
            x = np.stack([np.asarray(value[c]) for c in column], axis=1)
        else:
            x = np.asarray(value[column])
    else:
        x = np.asarray(value)
    if x.dtype == object:  # a list column: one array per row
        try:
            x = np.stack([np.asarray(row) for row in x])
        except ValueError as exc:
            raise InputError(f"column: expected {column!r} to hold examples of one fixed shape ({exc}).") from None
    if x.ndim == 1 and shape is None:
        x = x[:, None] if isinstance(column, list) else x
    return _reshape(x, shape, f"column {column!r}")


def _arrow_to_numpy(array: Any, name: str) -> np.ndarray:
    """A (chunked) Arrow column of fixed-shape examples -> ``(n, *dims)`` numpy."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    n = len(array)
    if array.null_count:
        raise InputError(f"column: {name!r} has {array.null_count} null example(s); expected every row filled.")
    if isinstance(array.type, pa.ExtensionType):
        if hasattr(array, "to_numpy_ndarray"):  # pyarrow's own fixed_shape_tensor
            return np.asarray(array.to_numpy_ndarray())
        try:  # Ray's tensor extension types
            out = array.to_numpy(zero_copy_only=False)
            if isinstance(out, np.ndarray) and out.dtype != object:
                return out
        except Exception:  # noqa: BLE001 - fall back to the storage lists
            pass
        array = array.storage
    dims: list[int] = []
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        if pa.types.is_fixed_size_list(array.type):
            size = array.type.list_size
        else:
            lengths = np.asarray(array.value_lengths())
            if len(lengths) and (lengths != lengths[0]).any():
                raise InputError(
                    f"column: {name!r} holds lists of different lengths ({lengths.min()}..{lengths.max()}); "
                    "expected examples of one fixed shape."
                )
            size = int(lengths[0]) if len(lengths) else 0
        dims.append(size)
        array = array.flatten()
        if array.null_count:
            raise InputError(f"column: {name!r} has null values inside examples; expected every value filled.")
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        raise InputError(f"column: {name!r} holds {array.type} values; expected numbers (or lists of numbers).")
    return array.to_numpy(zero_copy_only=False).reshape((n, *dims))


def features_from_arrow(table: Any, column: str | list[str], shape: tuple[int, ...] | None) -> np.ndarray:
    """Model inputs ``(n, ...)`` from an Arrow table: one column of arrays, or several scalar columns."""
    if isinstance(column, list):
        x = np.stack([_arrow_to_numpy(table.column(c), c) for c in column], axis=1)
        if x.ndim > 2:
            raise InputError(f"column: a list of columns must name scalar columns, got {column!r} with array values.")
    else:
        x = _arrow_to_numpy(table.column(column), column)
    return _reshape(x, shape, f"column {column!r}")


def columns_of(column: str | list[str] | dict[str, str], id_column: str | None) -> list[str]:
    names = list(column.values()) if isinstance(column, dict) else list(column) if isinstance(column, list) else [column]
    return names + ([id_column] if id_column is not None and id_column not in names else [])


def filesystem_and_path(text: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for a URI (``s3://...``) or a local path (made absolute)."""
    from pyarrow import fs as pafs

    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text)


def list_parquet(paths: Any) -> list[tuple[Any, str]]:
    """``(filesystem, path)`` of every Parquet file under ``paths`` (files or directories, local or URIs), sorted."""
    from pyarrow import fs as pafs

    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[tuple[Any, str]] = []
    for item in items:
        text = os.fspath(item)
        filesystem, path = filesystem_and_path(text)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"data: Parquet path {text!r} does not exist.")
        if info.type == pafs.FileType.Directory:
            selector = pafs.FileSelector(path, recursive=True)
            files = sorted(
                i.path for i in filesystem.get_file_info(selector)
                if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                and not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/") if part)
            )
            if not files:
                raise InputError(f"data: directory {text!r} holds no .parquet file.")
            found += [(filesystem, f) for f in files]
        else:
            found.append((filesystem, path))
    return found


def parquet_sources(
    paths: Any, column: str | list[str] | None, id_column: str | None
) -> tuple[list[dict[str, Any]], str | list[str]]:
    """Sources for the Parquet files under ``paths``; checks the columns against the first file's schema."""
    import pyarrow.parquet as pq

    files = list_parquet(paths)
    sources = []
    for filesystem, path in files:
        with filesystem.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle)
            if not sources:
                names = meta.schema_arrow.names
                column = _default_column(column, names, id_column, "Parquet file " + repr(path))
                for name in columns_of(column, id_column):
                    if name not in names:
                        arg = "id_column" if name == id_column else "column"
                        raise InputError(f"{arg}: {name!r} is not a column of {path!r}; its columns: {names}.")
            rows = meta.metadata.num_rows
        if rows:
            sources.append({"kind": "parquet", "path": path, "filesystem": filesystem, "rows": int(rows)})
    return sources, column


def _default_column(column: Any, names: Sequence[str], id_column: str | None,
                    where: str) -> str | list[str] | dict[str, str]:
    if isinstance(column, Mapping):  # named model inputs, each from its own column
        if not column or not all(isinstance(k, str) and isinstance(v, str) for k, v in column.items()):
            raise InputError(f"column: expected a mapping from model input names to column names (strings), got "
                             f"{column!r}.")
        return dict(column)
    if column is not None:
        if not isinstance(column, str) and not (
            isinstance(column, (list, tuple)) and column and all(isinstance(c, str) for c in column)
        ):
            raise InputError(f"column: expected a column name, a list of scalar column names or a mapping from "
                             f"model input names to columns, got {column!r}.")
        return list(column) if not isinstance(column, str) else column
    candidates = [n for n in names if n != id_column]
    if len(candidates) != 1:
        raise InputError(f"column: {where} has columns {list(names)}; say which holds the inputs with column=.")
    return candidates[0]


class PoolReader:
    """Worker side: the inputs (and ids) of any sorted global indices. Caches a few opened sources."""

    def __init__(self, pool: Pool, cache_size: int = 4) -> None:
        self.pool = pool
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cache_size = cache_size

    def read(self, indices: np.ndarray) -> tuple[Any, np.ndarray | None]:
        """``(x, ids)`` for ``indices`` (global, sorted ascending); ``ids`` is ``None`` without an id column.

        ``x`` is an array, or for a structured pool a dict (tuple) of arrays with the rows of every input.
        """
        starts = self.pool.starts
        which = np.searchsorted(starts, indices, side="right") - 1
        parts, ids = [], []
        for source in np.unique(which):
            local = indices[which == source] - starts[source]
            x, id_values = self._read_source(int(source), local)
            parts.append(x)
            ids.append(id_values)
        out_ids = None if self.pool.id_column is None else np.concatenate(ids)
        if self.pool.structure is None:
            return _joined(parts), out_ids
        keys, count = self.pool.structure
        leaves = tuple(_joined([part[i] for part in parts]) for i in range(count))
        return (leaves if keys is None else dict(zip(keys, leaves))), out_ids

    def _opened(self, source: int) -> Any:
        if source in self._cache:
            self._cache.move_to_end(source)
            return self._cache[source]
        spec = self.pool.sources[source]
        if spec["kind"] == "numpy":
            import ray

            value = ray.get(spec["ref"])
        else:
            import pyarrow.parquet as pq

            handle = spec["filesystem"].open_input_file(spec["path"])
            parquet = pq.ParquetFile(handle)
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
            value = (parquet, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self._cache[source] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def _read_source(self, source: int, local: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        pool, value = self.pool, self._opened(source)
        named = isinstance(pool.column, dict)  # one leaf per named input, each from its column
        if pool.structure is not None and not named:  # the leaves of a dict or tuple pool
            return tuple(np.asarray(leaf)[local] for leaf in value), None
        if pool.sources[source]["kind"] == "numpy":
            if isinstance(value, dict):
                rows = {name: np.asarray(col)[local] for name, col in value.items()}
                ids = None if pool.id_column is None else rows[pool.id_column]
                if named:
                    return tuple(features_from_numpy(rows, c, None) for c in pool.column.values()), ids
                return features_from_numpy(rows, pool.column, pool.shape), ids
            return features_from_numpy(np.asarray(value)[local], pool.column, pool.shape), None
        parquet, group_starts = value
        groups = np.unique(np.searchsorted(group_starts, local, side="right") - 1)
        table = parquet.read_row_groups([int(g) for g in groups], columns=columns_of(pool.column, pool.id_column))
        sizes = group_starts[groups + 1] - group_starts[groups]
        offset_in_table = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        group_of = np.searchsorted(group_starts, local, side="right") - 1
        positions = offset_in_table[np.searchsorted(groups, group_of)] + (local - group_starts[group_of])
        table = table.take(positions)
        ids = None if pool.id_column is None else table.column(pool.id_column).to_numpy(zero_copy_only=False)
        if named:
            return tuple(features_from_arrow(table, c, None) for c in pool.column.values()), ids
        return features_from_arrow(table, pool.column, pool.shape), ids


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    x = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if not x.flags.writeable:  # object-store views are read-only; frameworks expect writable inputs
        x = x.copy()
    return x
