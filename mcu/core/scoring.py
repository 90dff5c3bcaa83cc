"""Score one batch: the unit of work of every engine.

:func:`score_batch` samples one batch of examples and folds the samples into the streaming accumulators of
:mod:`mcu.metrics.streaming` (chunk by chunk: the ``(T, N, C)`` array never exists). :func:`mcu.predict` calls
it once per batch in this process, :mod:`mcu.distributed` once per batch on each Ray actor; both derive the
batch's seed with :func:`mcu._seeds.derive_seed` (the call's seed, the batch index), so the engines agree
number for number. Nothing in this module (or below it) imports an engine.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

from mcu._checks import check_choice, check_int
from mcu.core.sampling import MAX_SAMPLES, SamplingSession
from mcu.errors import InputError
from mcu.metrics.streaming import ClassificationAccumulator, RegressionAccumulator
from mcu.structured import rows

__all__ = ["CHUNK_BYTES", "TASKS", "BatchScores", "check_stopping_rule", "n_rows", "score_batch"]

TASKS = ("classification", "regression")
#: bytes of raw outputs per chunk of samples (the accumulators make ~6 float64 temporaries of a chunk)
CHUNK_BYTES = 1 << 20
#: the scores ``n_samples="auto"`` can stop on, per task; the first is the default
_SCORES = {"classification": ("mutual_information", "predictive_entropy", "expected_entropy"),
           "regression": ("predictive_mean",)}


class BatchScores(NamedTuple):
    """What :func:`score_batch` returns."""

    #: per-example summaries named like the :class:`mcu.Prediction` attributes (``n_samples`` included)
    values: dict[str, np.ndarray]
    #: the finished sampling session: what ``strategy="auto"`` chose (``session.info``, ``session.plan``)
    session: SamplingSession


def n_rows(x: Any) -> int:
    """The batch size of ``x`` (its first axis, shared by every input of a dict/tuple);
    :class:`~mcu.errors.InputError` without a batch axis."""
    return rows(x)


def check_stopping_rule(n_samples: Any, tol: Any, max_samples: Any, score: str | None, task: str) -> str:
    """Check ``n_samples`` with its stopping rule (``tol``, ``max_samples``, ``score``); return the score name.

    ``n_samples`` is a positive integer (then ``tol`` must be ``None``) or ``"auto"`` (then ``tol > 0`` and
    ``max_samples >= 2``). ``score`` defaults to the task's first stopping score (``mutual_information`` for
    classification, ``predictive_mean`` for regression).
    """
    if isinstance(n_samples, str) and n_samples == "auto":
        if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not tol > 0:
            raise InputError(f"tol: expected a positive number with n_samples='auto', got {tol!r}.")
        check_int(max_samples, "max_samples", minimum=2, maximum=MAX_SAMPLES)
    else:
        check_int(n_samples, "n_samples", minimum=1, maximum=MAX_SAMPLES)
        if tol is not None:
            raise InputError(f"tol: only used with n_samples='auto', got tol={tol!r} with n_samples={n_samples!r}.")
    score = score or _SCORES[task][0]
    check_choice(score, "score", _SCORES[task])
    return score


def score_batch(
    model: Any,
    x: Any,
    *,
    n_samples: int | str,
    task: str = "classification",
    from_logits: bool = True,
    seed: int | None = None,
    strategy: str = "auto",
    tol: float | None = None,
    max_samples: int = 1000,
    score: str | None = None,
    noise_var: Any = None,
    heteroscedastic: bool = False,
    **sample_options: Any,
) -> BatchScores:
    """MC-dropout summaries of one batch, memory bounded by the batch and one chunk of samples.

    Samples are drawn in chunks of about :data:`CHUNK_BYTES` of outputs (the first chunk: 10 samples) and
    folded into a streaming accumulator. With ``n_samples="auto"`` drawing stops once the Monte Carlo standard
    error of ``score`` is below ``tol`` for every example (checked at least every doubling), or at
    ``max_samples``.

    Args:
        model: a PyTorch or Keras model with dropout (see :func:`mcu.sample`).
        x: one batch of inputs, batch axis first.
        n_samples: samples per example, or ``"auto"`` (see :func:`check_stopping_rule`).
        task: ``"classification"`` or ``"regression"``.
        from_logits: classification outputs are logits (``True``) or probabilities (``False``).
        seed: the batch's seed (an engine derives it from the call's seed and the batch index).
        strategy: as in :func:`mcu.sample`.
        tol, max_samples, score: the stopping rule of ``n_samples="auto"``.
        noise_var, heteroscedastic: the aleatoric term for regression
            (:class:`mcu.metrics.RegressionAccumulator`).
        **sample_options: ``chunk_size``, ``precision``, ``backend``, ``mode``, ``max_memory``, ``workers``.

    Returns:
        :class:`BatchScores`: the per-example ``values`` (``n_samples`` per example; ``standard_error`` of
        ``score`` for classification or ``"auto"``) and the sampling ``session``.

    Shape:
        x: ``(n, ...)`` -> values ``(n,)`` or ``(n, C)`` each.
    """
    check_choice(task, "task", TASKS)
    score = check_stopping_rule(n_samples, tol, max_samples, score, task)
    if task == "classification":
        acc: Any = ClassificationAccumulator(from_logits)
    else:
        acc = RegressionAccumulator(heteroscedastic=heteroscedastic, noise_var=noise_var)
    target = max_samples if n_samples == "auto" else n_samples
    first = min(target, 10)
    session = SamplingSession(model, x, strategy=strategy, seed=seed, n_samples_hint=target, **sample_options)
    with session:
        chunk = session.draw(first)
        try:
            acc.update(chunk)
        except InputError as exc:  # the accumulator's "chunk" is the model's output: say so
            raise InputError(f"model: its outputs of shape {chunk.shape[1:]} per sample cannot be summarised with "
                             f"task={task!r}, from_logits={from_logits!r}: {exc}") from exc
        per_sample = max(1, chunk[0].nbytes)
        while acc.n_samples < target:
            if n_samples == "auto" and np.nanmax(acc.standard_error(score)) < tol:
                break
            step = int(min(target - acc.n_samples, max(1, CHUNK_BYTES // per_sample)))
            if n_samples == "auto":
                step = min(step, max(10, acc.n_samples))  # re-check the error at least every doubling
            acc.update(session.draw(step))
    values = acc.result()
    values["n_samples"] = np.full(n_rows(x), acc.n_samples, dtype=np.int64)
    if n_samples == "auto" or task == "classification":
        values["standard_error"] = acc.standard_error(score)
    return BatchScores(values, session)
