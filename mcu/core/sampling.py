"""``mcu.sample``: T stochastic forward passes of a dropout network, samples axis first."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mcu import _host
from mcu._checks import check_choice, check_int
from mcu.backends import resolve
from mcu.backends.base import MODES, PRECISIONS
from mcu.errors import DropoutSiteWarning, InputError
from mcu.structured import OUTPUT_HELP
from mcu.strategies import STRATEGIES, Plan
from mcu.strategies.auto import prepare
from mcu.strategies.base import SeedStream

__all__ = ["MAX_ROWS", "MAX_SAMPLES", "MAX_SEED", "SampleInfo", "SamplingSession", "sample"]

#: Most samples one call (or one session) may draw: the per-sample seeds are distinct 32-bit words up to here.
MAX_SAMPLES = 1 << 32
#: Largest seed, the same for every backend (seeds are 64-bit words).
MAX_SEED = (1 << 64) - 1
#: Largest ``chunk_size``: rows of one forward pass are indexed with 32-bit integers by some kernels.
MAX_ROWS = (1 << 31) - 1


def _leaves(x: Any) -> list[tuple[str, Any]]:
    """``x``'s inputs with their argument names (one, or each of a dict/tuple)."""
    if isinstance(x, dict):
        return [(f"x[{k!r}]", v) for k, v in x.items()]
    if isinstance(x, tuple):
        return [(f"x[{i}]", v) for i, v in enumerate(x)]
    return [("x", x)]


@dataclass
class SampleInfo:
    """What ran and why (``mcu.sample(..., return_info=True)``)."""

    backend: str
    backend_reason: str
    strategy: str
    strategy_reason: str
    chunk_size: int | None
    precision: str
    mode: str
    n_samples: int = 0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


class SamplingSession:
    """Draw MC-dropout samples in pieces while the model stays in MC mode; restores the model on exit.

    Used by :func:`sample` and by streaming consumers (``mcu.predict``) that decide how many samples to draw
    as they go. Draws continue one random stream, so a seeded session is reproducible for the same sequence
    of ``draw`` sizes.

    Example:
        >>> with SamplingSession(model, x, seed=0) as session:   # doctest: +SKIP
        ...     first = session.draw(10)                          # (10, N, *out)
    """

    def __init__(
        self,
        model: Any,
        x: Any,
        *,
        strategy: str = "auto",
        chunk_size: int | None = None,
        precision: str = "fp32",
        seed: int | None = None,
        backend: str | None = None,
        mode: str = "dropout",
        max_memory: int | None = None,
        workers: int | None = None,
        n_samples_hint: int = 2,
        output: Any = None,
    ) -> None:
        check_choice(strategy, "strategy", ["auto", *STRATEGIES])
        check_choice(precision, "precision", PRECISIONS)
        check_choice(mode, "mode", MODES)
        check_int(chunk_size, "chunk_size", minimum=1, maximum=MAX_ROWS, allow_none=True)
        check_int(seed, "seed", minimum=0, maximum=MAX_SEED, allow_none=True)
        check_int(max_memory, "max_memory", minimum=1, allow_none=True)
        check_int(workers, "workers", minimum=1, allow_none=True)
        named = isinstance(output, (str, int)) and not isinstance(output, bool)
        if not (output is None or callable(output) or named):
            raise InputError(f"output: expected {OUTPUT_HELP}, got {output!r}.")
        for name, leaf in _leaves(x):
            if isinstance(leaf, np.ndarray) and leaf.dtype.kind not in "biufc":
                raise InputError(f"{name}: expected an array of numbers (bool, int, float or complex), got dtype "
                                 f"{leaf.dtype}.")
        impl, choice = resolve(model, backend)
        impl.dropout_layers(model)  # NoDropoutError before any work
        model = impl.model_for_precision(model, precision)
        tensor = impl.to_tensor(model, x)
        if len(tensor.shape) == 0 or int(tensor.shape[0]) == 0:
            raise InputError(f"x: expected a batch with at least one example (N >= 1), got shape {tuple(tensor.shape)}.")
        self.plan = Plan(backend=impl, model=model, x=tensor, chunk_size=chunk_size, max_memory=max_memory,
                         precision=precision, seeds=SeedStream(seed), workers=workers,
                         seeded=seed is not None, output=output)
        self._requested, self._mode, self._hint = strategy, mode, n_samples_hint
        self.info = SampleInfo(impl.name, choice.reason, strategy, "", chunk_size, precision, mode)
        self._mc_mode, self._precision = impl.mc_mode(model, mode, tensor), impl.precision(model, precision)
        self._seed = seed
        self._entered: list[Any] = []
        self._spread_checked = False

    def __enter__(self) -> "SamplingSession":
        try:
            # MC mode and precision first: the strategy probe needs both
            runner = self._enter(self._mc_mode)
            if runner is not None:
                self.plan.model = runner  # what the passes run on (PyTorch: the model's sampling twin)
            self._enter(self._precision)
            self.strategy, self.info.strategy_reason = prepare(self.plan, self._requested, self._hint, self._mode)
            self.info.strategy = self.strategy.name
            self.info.details["copies_per_pass"] = self.plan.copies
            # seeding last (the probe must not consume the seeded stream), for what the passes run on
            self._enter(self.plan.backend.seeded(self.plan.model, self._seed))
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _enter(self, context: Any) -> Any:
        value = context.__enter__()
        self._entered.append(context)
        return value

    def __exit__(self, *exc_info: Any) -> None:
        while self._entered:
            self._entered.pop().__exit__(*exc_info)

    def draw(self, n_samples: int) -> np.ndarray:
        """``n_samples`` more samples, shape ``(n_samples, N, *out)``."""
        check_int(n_samples, "n_samples", minimum=1, maximum=MAX_SAMPLES - self.info.n_samples)
        if not self._entered:
            raise RuntimeError("SamplingSession.draw must be called inside its `with` block")
        start = time.perf_counter()
        out: np.ndarray | None = None
        done = 0
        for chunk in self.strategy.draw(self.plan, n_samples):
            if out is None:  # allocate once: no list of chunks, no concatenate copy
                out = _allocate((n_samples,) + chunk.shape[1:], chunk.dtype)
            out[done : done + len(chunk)] = chunk
            done += len(chunk)
        self.info.n_samples += n_samples
        self.info.seconds += time.perf_counter() - start
        assert out is not None and done == n_samples
        if not self._spread_checked and n_samples > 1:
            self._spread_checked = True
            if (out[1:] == out[0]).all():
                warnings.warn(
                    f"model: all {n_samples} MC samples are identical: the model's dropout has no effect on its "
                    "output (rates too small, or dropout on a path the output does not use); the spread is zero.",
                    DropoutSiteWarning, stacklevel=3)
        return out


def _allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The samples array, refused before it exists when it cannot fit in the memory available now."""
    need = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    available = _host.available_memory()
    if available is not None and need > available:
        raise InputError(
            f"n_samples: expected at most {available // max(1, need // shape[0]):,} samples here (the samples array "
            f"{shape} would take {need / 2**30:.1f} GiB; {available / 2**30:.1f} GiB of memory is available), got "
            f"{shape[0]:,}. Draw fewer, or use mcu.predict, whose memory does not grow with n_samples."
        )
    try:
        return np.empty(shape, dtype=dtype)
    except MemoryError as exc:
        raise InputError(
            f"n_samples: expected fewer samples; the samples array {shape} ({need / 2**30:.1f} GiB) could not be "
            "allocated. Draw fewer, or use mcu.predict, whose memory does not grow with n_samples."
        ) from exc


def sample(
    model: Any,
    x: Any,
    n_samples: int = 50,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
    precision: str = "fp32",
    seed: int | None = None,
    backend: str | None = None,
    mode: str = "dropout",
    max_memory: int | None = None,
    workers: int | None = None,
    output: Any = None,
    return_info: bool = False,
) -> Any:
    """Run ``n_samples`` stochastic forward passes with only dropout active; return the raw outputs.

    Args:
        model: a ``torch.nn.Module`` or a Keras 3 model/layer with at least one dropout layer.
        x: a batch, batch axis first: a numpy array or the framework's own tensor (any rank). numpy floating
            arrays are converted to the model's parameter dtype (PyTorch) or left to Keras' autocasting. A dict
            of them (``{"input_ids": ids, "attention_mask": mask}``) is passed by name (``model(**x)``), a tuple
            in order (``model(*x)``; Keras: the dict, or the tuple as a list); every input shares the batch axis.
        n_samples: number of stochastic passes ``T``, from 1 to ``2**32`` (:data:`MAX_SAMPLES`). The samples
            array must fit in the memory available when the first block is done: a larger request raises
            :class:`~mcu.errors.InputError` before the array is allocated (``mcu.predict`` streams instead).
        strategy: ``"auto"``, ``"loop"``, ``"vectorized"``, ``"prefix"`` or ``"parallel"`` (see
            :mod:`mcu.strategies`); all are exact. ``"auto"`` probes the candidates once per model and input
            shape and keeps the fastest.
        chunk_size: at most this many rows per forward pass (copies of the batch for ``"vectorized"``).
        max_memory: bytes the stacked copies may take (default: what inference on the model already holds,
            one full pass's activations plus its weights, the weights' share at most half the memory free on
            the model's device, except where a seeded call's samples depend on the copies per pass; at least
            4 MB).
        workers: threads for ``"parallel"`` (default: the CPU count).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; warns where the hardware lacks support).
        seed: an integer in ``[0, 2**64 - 1]``; makes the call reproducible without touching the global random
            state.
        backend: ``"torch"`` or ``"tensorflow"`` (aliases ``"pytorch"``, ``"tf"``, ``"keras"``); see
            :mod:`mcu.config` for the resolution order when omitted.
        mode: ``"dropout"`` (only dropout stochastic; BatchNorm uses running statistics) or ``"training"``
            (the whole model in training mode — the literal recipe; BatchNorm then normalises with batch
            statistics, so predictions depend on the batch. Statistics are restored afterwards).
        output: what to sample when the model returns a structure (a Hugging Face ``ModelOutput``, a tuple, a
            dict): a key or attribute name (``"logits"``), an integer index, or a callable taking the output.
            Without it, a structured output raises an error listing what is available.
        return_info: also return a :class:`SampleInfo` saying which backend and strategy ran, and why.

    Returns:
        ``numpy.ndarray`` of shape ``(n_samples, N, *output_shape)`` (and the info when asked).

    Shape:
        x: ``(N, *input_shape)`` -> samples: ``(T, N, *output_shape)``.

    The model is left exactly as it was — training flags, weights, BatchNorm statistics, dropout seed
    state — whether the call returns or raises. No gradients are recorded.
    """
    check_int(n_samples, "n_samples", minimum=1, maximum=MAX_SAMPLES)
    session = SamplingSession(
        model, x, strategy=strategy, chunk_size=chunk_size, precision=precision, seed=seed,
        backend=backend, mode=mode, max_memory=max_memory, workers=workers, n_samples_hint=n_samples,
        output=output,
    )
    with session:
        samples = session.draw(n_samples)
    return (samples, session.info) if return_info else samples
