"""Active learning on MC-dropout uncertainty: acquisition heuristics, pool queries, a resumable loop.

* :mod:`mcu.active.acquisition` — scores from samples ``(T, N, C)`` (higher = query first) and BatchBALD.
* :func:`query` — the top-``k`` examples of a pool (numpy, torch ``Dataset``/``DataLoader``, ``tf.data``),
  scored chunk by chunk with :func:`mcu.sample`.
* :class:`ActiveLearningLoop` — query → label (callback or CSV/JSON files) → retrain → evaluate, with a
  label budget, plateau stopping, a learning-curve history, and crash-safe state.

The query and the pieces other engines share with it (``score_chunk``, ``check_k``, ``sorted_subset``) live in
:mod:`mcu.active.querying`.

Example:
    >>> from mcu.active import HEURISTICS
    >>> "bald" in HEURISTICS and "batchbald" in HEURISTICS
    True
"""

from mcu.active import acquisition
from mcu.active.acquisition import HEURISTICS
from mcu.active.loop import ActiveLearningLoop, plot_history
from mcu.active.querying import query

__all__ = ["HEURISTICS", "ActiveLearningLoop", "acquisition", "plot_history", "query"]
