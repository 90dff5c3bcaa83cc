"""Pool scoring beyond one machine: MC-dropout predictions and active-learning queries on a Ray cluster.

* :func:`predict` — :func:`mcu.predict` over a numpy array, Parquet files or a Ray Dataset, with a pool of
  actors that each load the model once; per-example metrics are written to a Parquet directory.
* :func:`query` — :func:`mcu.active.query`'s top ``k``, computed without collecting the pool on the driver.
* :func:`read_prediction` — a result directory back into a :class:`mcu.Prediction` (pool order).
* :class:`ModelSource` / :func:`load_model` — factories and safe model-file loading (TorchScript,
  ``state_dict`` + factory, ``.keras`` with ``safe_mode``).

Results are deterministic: batch ``c`` (examples ``[c·b, (c+1)·b)``) is sampled with the seed derived from
``seed`` and ``c`` as on one machine, so they equal ``mcu.predict`` / ``mcu.active.query`` for the same
``seed``, ``batch_size`` and explicit ``strategy``, whatever the number of workers. See ``docs/distributed.md``.

Needs ``pip install "mcu[ray]"``. Importing this package imports neither Ray nor a framework; the first use
of :func:`predict` or :func:`query` imports Ray.

Example:
    >>> import mcu.distributed
    >>> sorted(mcu.distributed.__all__)
    ['ModelSource', 'RunSummary', 'load_model', 'predict', 'query', 'read_prediction']
"""

from __future__ import annotations

from mcu._lazy import lazy_attributes

__all__ = ["ModelSource", "RunSummary", "load_model", "predict", "query", "read_prediction"]

_LAZY = {
    "predict": "mcu.distributed.ray_engine",
    "query": "mcu.distributed.ray_engine",
    "RunSummary": "mcu.distributed.ray_engine",
    "read_prediction": "mcu.distributed.results",
    "ModelSource": "mcu.distributed.loading",
    "load_model": "mcu.distributed.loading",
}


_EXTRAS = {"ray": "ray", "pyarrow": "ray", "pandas": "ray"}

__getattr__, __dir__ = lazy_attributes("mcu.distributed", _LAZY, _EXTRAS, globals())
