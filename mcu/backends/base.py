"""The backend protocols: the only framework surface that strategies and the core may touch.

Three protocols, each typed and documented here, and nothing else is reached by name:

- :class:`Backend` — what every backend provides: find the dropout sites, switch them on for mcu's own passes
  (:meth:`~Backend.mc_mode`), seed them, convert inputs, run one pass, stack copies, read results back. The
  ``loop`` and ``vectorized`` strategies need nothing more.
- :class:`FastPaths` — what the ``prefix`` and ``parallel`` strategies and ``auto``'s probe need on top:
  per-sample random sources, a :class:`Split` of the model, activation metering, worker threads. A backend
  provides all of it or none (:func:`has_fast_paths`); without it, ``auto`` chooses among loop and vectorized.
- :class:`Split` — a model cut into a deterministic *prefix*, run once on the ``N`` inputs, and a stochastic
  *suffix*, run on ``k`` copies of the prefix's outputs (the *frontier*), sample ``j`` from random source
  ``j``.

A framework is one package in ``mcu/backends/<name>/`` implementing these plus one line in
:data:`mcu.backends.REGISTRY`. Tensors, models and random sources are the framework's own types (``Any`` here:
this module imports no framework).
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Backend", "FastPaths", "MODES", "PRECISIONS", "Split", "has_fast_paths"]

#: ``"dropout"``: only dropout layers stochastic (the default); ``"training"``: the whole model in training
#: mode, the literal recipe (BatchNorm then uses batch statistics).
MODES = ("dropout", "training")
PRECISIONS = ("fp32", "bf16", "fp16")


@runtime_checkable
class Backend(Protocol):
    """One framework's sampling primitives. Every method is safe to call from many threads at once and leaves
    the user's model unchanged (training flags, weights, normalisation statistics), even when it raises."""

    #: the registry name (``"torch"``, ``"tensorflow"``)
    name: str

    def is_model(self, obj: Any) -> bool:
        """Whether ``obj`` is a model of this framework (no import: looks at ``sys.modules``)."""

    def dropout_layers(self, model: Any) -> Sequence[Any]:
        """Every dropout site of ``model``; raises :class:`~mcu.errors.NoDropoutError` if none."""

    def mc_mode(self, model: Any, mode: str = "dropout", x: Any = None) -> ContextManager[Any]:
        """Every dropout site stochastic, everything else in inference mode (``mode="training"``: the whole
        model in training mode), no gradients. Yields the model to run passes on (the model itself, or a
        parameter-sharing stand-in with its own flags); the caller runs passes only on that. ``x`` (an input
        batch from :meth:`to_tensor`) lets the backend find sites that only a forward pass reveals."""

    def stacking_problem(self, model: Any, split: Split | None = None) -> str | None:
        """Why ``k`` stacked copies of the batch in one pass would share randomness (e.g. dropout applied to a
        weight: one draw per pass), so only the loop is exact; None when stacking is exact. ``model`` is what
        :meth:`mc_mode` yielded."""

    def seeded(self, model: Any, seed: int | None) -> ContextManager[None]:
        """Make the passes inside the block reproducible from ``seed``; leave no trace outside it (``None``:
        fresh randomness)."""

    def model_for_precision(self, model: Any, precision: str) -> Any:
        """The model to run in ``precision`` (one of :data:`PRECISIONS`): itself (autocast) or a cached
        low-precision copy."""

    def precision(self, model: Any, precision: str) -> ContextManager[None]:
        """Run forward passes in ``precision`` (autocast); fp32 is a no-op."""

    def to_tensor(self, model: Any, x: Any) -> Any:
        """Validate ``x`` (finite floats, or integer ids; a dict/tuple of them as a
        :class:`~mcu.structured.Batch`) and convert it to framework tensors on the model's device."""

    def forward(self, model: Any, x: Any) -> Any:
        """One stochastic forward pass (inside :meth:`mc_mode`, on the model it yielded); the raw output."""

    def select_output(self, out: Any, output: Any) -> Any:
        """The tensor to sample from a pass's raw output: ``out`` itself when it is a tensor and ``output`` is
        None, else the key/attribute/index/callable ``output`` names (:func:`mcu.structured.select_output`)."""

    def repeat(self, x: Any, n: int) -> Any:
        """``n`` copies of ``x`` stacked along the batch axis: ``[x; x; ...]``, shape ``(n * N, ...)``."""

    def to_numpy(self, t: Any) -> np.ndarray:
        """A host numpy copy of ``t`` (low-precision floats widened to float32)."""


@runtime_checkable
class Split(Protocol):
    """A model cut at its dropout sites into a deterministic prefix and a stochastic suffix.

    Exact: the prefix is a deterministic function of the input, and each copy of the frontier meets its own
    dropout masks, as the stacked copies of the vectorized strategy do.
    """

    #: one line for ``SampleInfo``: how much runs once and how much per sample
    description: str
    #: True when some site in the suffix draws from a framework's shared random state instead of the per-sample
    #: sources (then threads would make results irreproducible: ``parallel`` is not used)
    native_rng: bool
    #: True when :meth:`suffix` takes the frontier unrepeated and stacks the copies itself (else the caller
    #: passes ``k`` stacked copies made with :meth:`Backend.repeat`)
    repeats_frontier: bool

    def prefix(self, x: Any) -> list[Any]:
        """The frontier for the ``N`` examples of ``x``: every prefix value the suffix reads."""

    def suffix(self, frontier: list[Any], sources: Any, **options: Any) -> Any:
        """``k = len(sources)`` samples stacked along the batch axis, shape ``(k * N, *out)``; sample ``j``
        draws its masks from source ``j`` only (:meth:`FastPaths.generators`), so samples do not depend on how
        they are grouped into passes or threads."""

    def row_block(self, frontier: list[Any]) -> int | None:
        """Examples per suffix run when the suffix should run on row blocks (large per-example tables), else
        None. A backend without row blocks returns None."""

    def rows(self, frontier: list[Any], start: int, stop: int) -> list[Any]:
        """Examples ``start:stop`` of the frontier."""


@runtime_checkable
class FastPaths(Protocol):
    """What the fast strategies need beyond :class:`Backend` (see :func:`has_fast_paths`)."""

    def split(self, model: Any, x: Any) -> tuple[Split | None, str]:
        """A validated :class:`Split` of the model :meth:`Backend.mc_mode` yielded, for inputs shaped like
        ``x``, cached; ``(None, reason)`` when the model cannot be split. Validation runs dropout inactive and
        draws no random numbers."""

    def generators(self, model: Any, seeds: list[int]) -> Any:
        """One random source per sample seed, for :meth:`Split.suffix` (per-sample counter-based streams)."""

    def activation_bytes(self, run: Callable[[], Any]) -> int | None:
        """Bytes of the activations ``run()`` (one pass) produces: a rough per-pass memory estimate for
        ``auto``'s budget; None when nothing could be measured."""

    def nbytes(self, t: Any) -> int:
        """Bytes of tensor ``t``."""

    def weight_bytes(self, model: Any) -> int:
        """Bytes of the model's weights (PyTorch: parameters and buffers), each storage counted once: with one
        pass's activations, what inference on the model already holds (``auto``'s default memory budget)."""

    def free_bytes(self, model: Any) -> int | None:
        """Bytes free on the device the model runs on (host memory available on a CPU), None when unknown:
        ``auto``'s default memory budget never takes more than half of it for the weights' share."""

    def worker_threads(self, workers: int) -> ContextManager[None]:
        """Adapt the framework's intra-op threads while ``workers`` Python threads sample (process-wide
        setting, reference counted across concurrent calls)."""

    def worker_context(self, model: Any, precision: str) -> ContextManager[None]:
        """What :meth:`Backend.mc_mode` and :meth:`Backend.precision` set up thread-locally, for a worker
        thread."""


def has_fast_paths(backend: Backend) -> bool:
    """Whether ``backend`` implements :class:`FastPaths` (every member present)."""
    return isinstance(backend, FastPaths)
