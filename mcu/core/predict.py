"""``mcu.predict``: MC-dropout predictions summarised on the fly, memory O(N·C) whatever T is.

Examples are scored in batches of ``batch_size`` by :func:`mcu.core.scoring.score_batch` (samples drawn in
chunks and folded into the streaming accumulators of :mod:`mcu.metrics.streaming`; the ``(T, N, C)`` array
never exists).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from scipy import stats

from mcu._seeds import derive_seeds
from mcu.core.engines import engine_function
from mcu.core.progress import progress_bar
from mcu._checks import check_choice, check_int
from mcu.core.sampling import MAX_SEED, SamplingSession
from mcu.core.scoring import TASKS, check_stopping_rule, n_rows, score_batch
from mcu.structured import take_rows
from mcu.errors import InputError

__all__ = ["DEFAULT_BATCH", "Prediction", "predict"]

#: examples per batch when the caller gives none
DEFAULT_BATCH = 1024
#: the seed of each example batch (the old name of :func:`mcu._seeds.derive_seeds`)
batch_seeds = derive_seeds
#: What ``**sample_options`` may hold with ``engine="local"``.
SAMPLE_OPTIONS = ("chunk_size", "precision", "backend", "mode", "max_memory", "workers", "output")


class Prediction:
    """Per-example MC-dropout summaries. Attributes are named like the metric functions.

    Classification: ``mean`` (= ``mean_probabilities``, ``(N, C)``), ``label``, ``predictive_entropy``,
    ``expected_entropy``, ``mutual_information``, ``variation_ratio``, ``margin``, ``max_probability``,
    ``predictive_variance``. Regression: ``mean`` (= ``predictive_mean``), ``std`` (= ``total_std``),
    ``epistemic_variance``, ``epistemic_std``, ``aleatoric_variance``, ``total_variance``, and
    :meth:`interval`. Both: ``n_samples`` (per example, ``(N,)``), ``standard_error`` (of the score used
    for ``n_samples="auto"``), ``task``.
    """

    def __init__(self, task: str, values: dict[str, np.ndarray]) -> None:
        self.task = task
        self._values = values
        for name, value in values.items():
            setattr(self, name, value)
        if task == "classification":
            self.mean = values["mean_probabilities"]
            self.label = np.argmax(self.mean, axis=-1) if self.mean.size else np.zeros(0, dtype=np.int64)
        else:
            self.mean = values["predictive_mean"]
            self.std = values["total_std"]

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Central Gaussian predictive interval ``mean ± z·std`` at ``level`` (regression only).

        Empirical-quantile intervals need the samples: use ``mcu.sample`` with
        :func:`mcu.metrics.quantile_interval`.
        """
        if self.task != "regression":
            raise InputError("interval: only available for task='regression'.")
        if not isinstance(level, numbers.Real) or not 0 < level < 1:
            raise InputError(f"level: expected a number in (0, 1), got {level!r}.")
        z = stats.norm.ppf(0.5 + level / 2)
        return self.mean - z * self.std, self.mean + z * self.std

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of numpy arrays (``label`` included for classification)."""
        out = dict(self._values)
        if self.task == "classification":
            out["label"] = self.label
        return out

    def table(self, max_rows: int = 10) -> str:
        """A plain-text table of the per-example scalar metrics (first ``max_rows`` examples)."""
        values = self.to_dict()
        if self.task == "regression":
            values = {"mean": self.mean, "std": self.std, **values}
        # one column per per-example scalar (a single regression output of shape (N, 1) counts as one)
        columns = {k: v.reshape(len(v)) for k, v in values.items() if v.ndim == 1 or v.shape[1:] == (1,)}
        names = list(columns)
        rows = [[f"{columns[n][i]:.4g}" if columns[n].dtype.kind == "f" else str(columns[n][i]) for n in names]
                for i in range(min(len(self), max_rows))]
        widths = [max(len(n), *(len(r[j]) for r in rows)) if rows else len(n) for j, n in enumerate(names)]
        lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        if len(self) > max_rows:
            lines.append(f"... {len(self) - max_rows} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        fields = ", ".join(sorted(self._values))
        n_samples = self._values["n_samples"]
        t = f"{int(n_samples.min())}..{int(n_samples.max())}" if n_samples.size else "0"
        return f"Prediction(task={self.task!r}, N={len(self)}, T={t}, fields=[{fields}])"


def predict(
    model: Any,
    x: Any,
    n_samples: int | str = 50,
    *,
    task: str = "classification",
    from_logits: bool = True,
    seed: int | None = None,
    strategy: str = "auto",
    batch_size: int | None = None,
    tol: float | None = None,
    max_samples: int = 1000,
    score: str | None = None,
    noise_var: Any = None,
    heteroscedastic: bool = False,
    progress: bool | None = None,
    engine: str = "local",
    **sample_options: Any,
) -> Prediction:
    """Sample and summarise: per-example uncertainty with memory bounded by the batch, never by T.

    Args:
        model: a PyTorch or Keras model with dropout (see :func:`mcu.sample`).
        x: inputs, batch axis first (numpy array or framework tensor).
        n_samples: samples per example ``T``, or ``"auto"``: draw chunks until the Monte Carlo standard
            error of ``score`` is below ``tol`` for every example of the batch, or ``max_samples`` is reached.
        task: ``"classification"`` (outputs ``(N, C)``; logits if ``from_logits``) or ``"regression"``.
        from_logits: classification outputs are logits (softmax applied) or probabilities (checked).
        seed: reproducible results for the same ``batch_size`` (each batch gets its own derived seed).
        strategy: as in :func:`mcu.sample`.
        batch_size: examples per batch (default ``min(N, 1024)``).
        tol, max_samples, score: the stopping rule of ``n_samples="auto"`` (score defaults to
            ``mutual_information`` for classification, ``predictive_mean`` for regression).
        noise_var, heteroscedastic: the aleatoric term for regression (see
            :class:`mcu.metrics.RegressionAccumulator`).
        progress: show a progress bar (tqdm) over examples; ``None``: as the ``MCU_PROGRESS`` environment
            variable says, else only when stderr is a terminal.
        engine: ``"local"`` (this process) or ``"ray"``: the same computation on Ray Data actors, equal for
            the same seed, batch size and strategy (:func:`mcu.distributed.predict`; ``num_workers`` and other
            Ray options go through ``**sample_options``; the ``output`` sample option becomes its
            ``model_output``).
        **sample_options: ``chunk_size``, ``precision``, ``backend``, ``mode``, ``max_memory``, ``workers``.

    Returns:
        A :class:`Prediction`.

    Shape:
        x: ``(N, ...)`` -> per-example metrics ``(N,)`` or ``(N, C)``; peak extra memory ~ one chunk of
        ``(t, batch_size, C)`` outputs plus O(N·C) results.
    """
    remote = engine_function(engine, "predict")
    if remote is not None:  # the engine's predict writes files to its own output=: ours is model_output there
        options = {k: v for k, v in sample_options.items() if k != "output"}
        return remote(model, x, n_samples, task=task, from_logits=from_logits, seed=seed, strategy=strategy,
                      batch_size=batch_size, tol=tol, max_samples=max_samples, score=score, noise_var=noise_var,
                      heteroscedastic=heteroscedastic, progress=progress,
                      model_output=sample_options.get("output"), **options)
    unknown = sorted(set(sample_options) - set(SAMPLE_OPTIONS))
    if unknown:
        raise InputError(f"{unknown[0]}: unknown keyword argument of mcu.predict; expected one of the documented "
                         f"arguments or sample options {', '.join(SAMPLE_OPTIONS)}.")
    check_choice(task, "task", TASKS)
    check_int(seed, "seed", minimum=0, maximum=MAX_SEED, allow_none=True)
    score = check_stopping_rule(n_samples, tol, max_samples, score, task)
    n = n_rows(x)
    check_int(batch_size, "batch_size", minimum=1, allow_none=True)
    if n == 0:
        raise InputError("x: expected a batch with at least one example (N >= 1), got N = 0.")
    batch = batch_size or min(n, DEFAULT_BATCH)
    starts = range(0, n, batch)
    seeds = derive_seeds(seed, len(starts))
    parts: list[dict[str, np.ndarray]] = []
    choice: tuple[str, dict] | None = None
    with progress_bar(progress, total=n, desc="mcu.predict", unit="ex") as bar:
        for start, batch_seed in zip(starts, seeds):
            xb = take_rows(x, slice(start, start + batch))
            batch_strategy, options = strategy, sample_options
            if choice is not None and n_rows(xb) != batch:
                batch_strategy, options = choice  # a last, smaller batch: no second probe for its shape
            part, session = score_batch(model, xb, n_samples=n_samples, task=task, from_logits=from_logits,
                                        seed=batch_seed, strategy=batch_strategy, tol=tol, max_samples=max_samples,
                                        score=score, noise_var=noise_var, heteroscedastic=heteroscedastic, **options)
            parts.append(part)
            if choice is None:
                choice = _reuse(strategy, session, sample_options)
            bar.update(n_rows(xb))
    return Prediction(task, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def _reuse(strategy: str, session: SamplingSession, sample_options: dict) -> tuple[str, dict]:
    """What ``auto`` chose for a full batch, as explicit settings for a smaller one: the same strategy and
    rows per pass (so about the same memory), without probing again; with per-sample masks the samples do
    not depend on that choice anyway."""
    copies = session.plan.copies
    if strategy != "auto" or "chunk_size" in sample_options or copies is None:
        return strategy, sample_options
    return session.info.strategy, {**sample_options, "chunk_size": copies * session.plan.n_rows}
