"""Per-example results as Arrow tables (written to Parquet by the workers), and reading them back.

One row per pool example: ``index`` (its global position in the pool), ``id`` (when the pool has an id
column), then the fields of :class:`mcu.Prediction` — for classification ``mean_probabilities`` (a
fixed-size list of C floats), ``label``, ``predictive_entropy``, ``expected_entropy``, ``mutual_information``,
``variation_ratio``, ...; for regression ``predictive_mean``, ``total_std``, ``epistemic_variance``, ... —
and ``n_samples``. Arrays with more than one value per example are stored as fixed-size lists (readable by any
Parquet reader), with the per-example shape in the field metadata when it has more than one axis.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from mcu.errors import InputError, MCUError

__all__ = ["prediction_from_table", "read_prediction", "to_table"]

_RESERVED = ("index", "id", "label")


def to_table(index: np.ndarray, ids: np.ndarray | None, values: dict[str, np.ndarray]) -> Any:
    """An Arrow table with one row per example: ``index``, optional ``id``, then one column per field."""
    import pyarrow as pa

    columns: dict[str, Any] = {"index": pa.array(np.asarray(index, dtype=np.int64))}
    fields = [pa.field("index", pa.int64())]
    if ids is not None:
        columns["id"] = pa.array(ids)
        fields.append(pa.field("id", columns["id"].type))
    for name, value in values.items():
        value = np.asarray(value)
        if value.ndim == 1:
            array = pa.array(value)
            fields.append(pa.field(name, array.type))
        else:
            per_item = value.shape[1:]
            flat = np.ascontiguousarray(value).reshape(-1)
            array = pa.FixedSizeListArray.from_arrays(pa.array(flat), int(np.prod(per_item)))
            metadata = {b"shape": json.dumps(list(per_item)).encode()}
            fields.append(pa.field(name, array.type, metadata=metadata))
        columns[name] = array
    return pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))


def _column_to_numpy(table: Any, name: str) -> np.ndarray:
    import pyarrow as pa

    field = table.schema.field(name)
    array = table.column(name).combine_chunks()
    if not pa.types.is_fixed_size_list(array.type):
        return array.to_numpy(zero_copy_only=False)
    metadata = field.metadata or {}
    shape = json.loads(metadata[b"shape"]) if b"shape" in metadata else [array.type.list_size]
    return array.flatten().to_numpy(zero_copy_only=False).reshape((len(array), *shape))


def read_prediction(path: str | os.PathLike[str]) -> Any:
    """Read a result directory written by :func:`mcu.distributed.predict` into a :class:`mcu.Prediction`.

    Rows are put back in pool order; every global index must appear exactly once (an
    :class:`~mcu.errors.MCUError` otherwise). The whole result is loaded into memory: for very large pools read
    the Parquet files with any Arrow/pandas/Spark reader instead. When the pool had an id column, the
    prediction gets an ``id`` attribute ``(N,)``.

    Example:
        >>> run = mcu.distributed.predict(model, x, 30, output="out/", seed=0)   # doctest: +SKIP
        >>> prediction = mcu.distributed.read_prediction("out/")               # doctest: +SKIP
    """
    import pyarrow.dataset as ds

    text = os.fspath(path)
    try:
        table = ds.dataset(text, format="parquet").to_table()
    except (FileNotFoundError, OSError) as exc:
        raise InputError(f"path: cannot read Parquet results from {text!r} ({exc}).") from exc
    return prediction_from_table(table, repr(text))


def prediction_from_table(table: Any, where: str) -> Any:
    """A :class:`mcu.Prediction` from result rows in any order; checks every index appears exactly once."""
    from mcu.core.predict import Prediction

    if "index" not in table.column_names:
        raise InputError(f"path: {where} has no 'index' column; expected the output of mcu.distributed.predict.")
    index = table.column("index").to_numpy()
    order = np.argsort(index, kind="stable")
    index = index[order]
    if len(index) and (index[0] != 0 or index[-1] != len(index) - 1 or (np.diff(index) != 1).any()):
        unique = np.unique(index)
        raise MCUError(
            f"path: {where} is not a complete result: {len(index)} rows, {len(index) - len(unique)} duplicate "
            f"index(es), {int(unique[-1]) + 1 - len(unique)} missing below {int(unique[-1])}. Was it written by "
            "two runs into the same directory?"
        )
    table = table.take(order)
    if "mean_probabilities" in table.column_names:
        task = "classification"
    elif "predictive_mean" in table.column_names:
        task = "regression"
    else:
        raise InputError(f"path: {where} holds neither mean_probabilities nor predictive_mean.")
    values = {name: _column_to_numpy(table, name) for name in table.column_names if name not in _RESERVED}
    prediction = Prediction(task, values)
    if "id" in table.column_names:
        prediction.id = table.column("id").to_numpy(zero_copy_only=False)
    return prediction
