"""Strategy preparation and the ``auto`` choice.

``auto`` picks the fastest exact strategy (in the requested precision) for this model and input shape by a
short probe: each candidate (loop; vectorized and prefix at a few copies per pass, largest first; parallel)
runs one block after a warm-up, and the lowest time per sample wins. A *seeded* call compares only
configurations that return the same samples (prefix/parallel with per-sample random streams, any copies or
workers, PyTorch splits with or without fused channel dropout + convolution pairs) up to floating-point
rounding — the masks are identical, the sums may be added in another order; where the model's dropout draws
from a shared random state it uses a fixed configuration — so timing never changes a seeded call's masks.
The probe runs under a fixed seed inside the backend's ``seeded`` block, so it neither consumes the user's
random stream nor changes a seeded call's result. The choice is cached per model, per-example input shape,
batch size, precision and sample count bucket, so it is stable across calls, and it is explained in
``SampleInfo``. Copies per pass are capped by a memory budget (``max_memory``; by default what inference on
the model already holds — its weights plus one full pass's activations, the weights' share at most half the
memory free on the model's device — at least 4 MB).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from typing import Any, Iterator

from mcu.backends.base import has_fast_paths
from mcu.errors import InputError
from mcu.strategies import STRATEGIES
from mcu.strategies.base import Plan, SeedStream
from mcu.strategies.loop import LoopStrategy
from mcu.strategies.parallel import ParallelStrategy
from mcu.strategies.prefix import DEFAULT_ROWS as PREFIX_ROWS
from mcu.strategies.prefix import PrefixStrategy
from mcu.strategies.vectorized import DEFAULT_ROWS as VECTORIZED_ROWS
from mcu.strategies.vectorized import VectorizedStrategy
from mcu.strategies.vectorized import blocks as block_sizes

__all__ = ["prepare"]

MIN_BUDGET = 4 << 20
_COPIES = (1, 2, 4, 8, 16, 32, 64, 128)
_cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_SPLIT_STRATEGIES = ("prefix", "parallel")
DEFAULT_ROWS = {"vectorized": VECTORIZED_ROWS, "prefix": PREFIX_ROWS, "parallel": PREFIX_ROWS}


def _attach_split(plan: Plan) -> str:
    """Ask the backend for a validated split of the model; keep it on the plan. Returns the reason."""
    if has_fast_paths(plan.backend):
        split, why = plan.backend.split(plan.model, plan.x)
    else:
        split, why = None, f"the {plan.backend.name} backend cannot split models"
    plan.split = split
    return why


def _explicit(plan: Plan, requested: str) -> tuple[Any, str]:
    """An explicitly requested strategy; prefix/parallel fall back cleanly (and say so) when they cannot run."""
    if requested not in _SPLIT_STRATEGIES:
        return STRATEGIES[requested], "requested"
    why = _attach_split(plan)
    if plan.split is None:
        return VectorizedStrategy(), f"{requested!r} requested, but the model cannot be split ({why}): ran 'vectorized'"
    if requested == "parallel" and plan.split.native_rng:
        return PrefixStrategy(), (
            "'parallel' requested, but some dropout draws from a shared random state (Keras seed generators, "
            "torch AlphaDropout), which threads would make irreproducible: ran 'prefix'; split: " + why
        )
    return STRATEGIES[requested], f"requested; split: {why}"


def _within_budget(plan: Plan, strategy: Any, reason: str, n_samples: int) -> str:
    """Cap an explicitly requested strategy's copies per pass by the memory budget (as ``auto`` does), unless
    the caller set ``chunk_size``. The measurement is cached per model and input shape."""
    if strategy.name == "loop":
        return reason
    if plan.chunk_size is not None:
        plan.copies = plan.copies_per_pass(DEFAULT_ROWS[strategy.name])
        return reason
    key = ("limits", *_key(plan, n_samples))
    cache = _cache.setdefault(plan.model, {})
    if key not in cache:
        cache[key] = _isolated(plan, lambda: _limits(plan, n_samples))
    budget, limits, rows = cache[key]
    default = min(n_samples, plan.copies_per_pass(DEFAULT_ROWS[strategy.name],
                                                  None if strategy.name == "vectorized" else rows))
    plan.copies = min(default, limits[strategy.name])
    # parallel's limit is shared between its workers: fewer copies per block than samples is no cap then
    wanted = min(default, max(1, n_samples // _workers(plan))) if strategy.name == "parallel" else default
    if plan.copies < wanted:
        reason += (f"; copies per pass capped at {plan.copies} (default {default}) by the memory budget of "
                   f"{budget / 2**20:.0f} MB (max_memory=)")
    return reason


def _key(plan: Plan, n_samples: int) -> tuple:
    native_rng = plan.split.native_rng if plan.split is not None else None
    return (tuple(plan.x.shape), str(plan.x.dtype), plan.chunk_size, plan.max_memory, min(n_samples, _COPIES[-1]),
            plan.precision, plan.seeded, plan.split is not None, native_rng)


def _isolated(plan: Plan, measure: Any) -> Any:
    """Run a measurement under a fixed seed: it must neither consume nor depend on the user's random stream."""
    seeds, plan.seeds = plan.seeds, SeedStream(0)
    try:
        with plan.backend.seeded(plan.model, 0):
            return measure()
    finally:
        plan.seeds = seeds


def _budget(plan: Plan, full_pass_bytes: int | None) -> int:
    """Bytes the copies may take: ``max_memory``, else what inference on the model already holds — one full
    pass's activations and its weights — so that sampling at most about doubles it (>= MIN_BUDGET). The
    weights' share stops at half of the memory free on the model's device, and is left out where that is
    unknown: a model filling most of a GPU must not get a budget as large as itself. Where the copies per pass
    decide a seeded call's samples (no per-sample streams), free memory is not consulted: the samples must
    not depend on the machine's state."""
    if plan.max_memory is not None:
        return plan.max_memory
    activations, weights = full_pass_bytes or 0, plan.backend.weight_bytes(plan.model)
    if not (plan.seeded and (plan.split is None or plan.split.native_rng)):
        free = plan.backend.free_bytes(plan.model)
        weights = 0 if free is None else min(weights, max(0, free // 2 - activations))
    return max(MIN_BUDGET, activations + weights)


def _max_copies(plan: Plan, budget: int, per_copy: int | None, n_samples: int) -> int:
    if plan.chunk_size is not None:
        return max(1, min(n_samples, plan.chunk_size // plan.n_rows))
    if per_copy is None:  # no estimate on this backend: stay within ~1024 rows per pass
        return max(1, min(n_samples, 1024 // plan.n_rows))
    return max(1, min(n_samples, budget // max(per_copy, 1)))


#: Timed repeats per probed configuration (the fastest counts: interference from other processes only ever
#: makes a run slower), and the time after which a configuration is not repeated.
PROBE_REPEATS, PROBE_SECONDS, PROBE_SCANS = 3, 0.05, 2
#: The second scan re-times only configurations (any family, the loop too) within this factor of the best time
#: of the first.
RESCAN_FACTOR = 2.0
#: Worker threads are only probed when the best single-thread block takes at least this long.
PARALLEL_MIN_BLOCK_SECONDS = 2e-3
#: The split without fused pairs is probed only while the fused split's best block has fewer copies than this.
UNFUSED_PROBE_COPIES = 32
#: With a split, vectorized is also probed when one full pass takes less than this (per sample).
TINY_PASS_SECONDS = 2e-4


def _time_per_sample(strategy: Any, plan: Plan, copies: int) -> float:
    plan.copies = copies
    n = copies * _workers(plan) if strategy.name == "parallel" else copies  # one block per worker thread
    for _ in strategy.draw(plan, n):  # warm-up (graph tracing, allocator)
        pass
    best, spent = float("inf"), 0.0
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        for _ in strategy.draw(plan, n):
            pass
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
        if spent > PROBE_SECONDS:
            break
    return best / n


def _limits(plan: Plan, n_samples: int) -> tuple[int, dict[str, int], int]:
    """The memory budget, per strategy the most copies per pass that stay within it, and the rows one copy
    puts in a suffix pass (N, or the row block of a split with fused pairs). One full pass and suffix passes
    are measured; call under the backend's ``seeded`` block: they draw random numbers."""
    backend = plan.backend
    per_copy_full = backend.activation_bytes(lambda: backend.forward(plan.model, plan.x))
    budget = _budget(plan, per_copy_full)
    limits = {"vectorized": _max_copies(plan, budget, per_copy_full, n_samples)}
    rows = plan.n_rows
    if plan.split is not None:
        limits["prefix"], rows = _prefix_limit(plan, budget, n_samples)
        # every worker holds its own block: the budget is shared between them
        limits["parallel"] = max(1, limits["prefix"] // _workers(plan))
    return budget, limits, rows


def _prefix_limit(plan: Plan, budget: int, n_samples: int) -> tuple[int, int]:
    """The most copies per suffix pass of ``plan.split`` within ``budget``, and the rows one copy puts in a pass
    (measured; under the backend's ``seeded`` block)."""
    backend, rows = plan.backend, plan.n_rows
    frontier = plan.split.prefix(plan.x)
    if plan.split.fused:
        # Fused pairs build per-example tables shared by all copies, for all examples at once or in row
        # blocks of `step` examples: one row block at one and two copies gives the fixed bytes (tables)
        # and the bytes per copy.
        step = plan.split.row_block(frontier)
        rows = step or plan.n_rows
        block = frontier if step is None else plan.split.rows(frontier, 0, step)
        one, two = (backend.activation_bytes(lambda k=k: plan.split.suffix(
            block, backend.generators(plan.model, list(range(k))))) for k in (1, 2))
        per_copy = None if one is None or two is None else max(two - one, 1)
        fixed = 0 if per_copy is None else max(one - per_copy, 0)
        # The tables, like the frontier, are held once per call whatever the copies: they come out of an
        # explicit max_memory, but do not shrink the default floor for the copies (MIN_BUDGET).
        room = budget - fixed if plan.max_memory is not None else max(budget - fixed, MIN_BUDGET)
        return _max_copies(plan, max(room, per_copy or 1), per_copy, n_samples), rows
    suffix = backend.activation_bytes(lambda: plan.split.suffix(frontier, backend.generators(plan.model, [0])))
    stacked = 0 if plan.split.repeats_frontier else sum(backend.nbytes(f) for f in frontier)
    per_copy = None if suffix is None else suffix + stacked  # a repeated frontier buffer holds every copy
    return _max_copies(plan, budget, per_copy, n_samples), rows


@contextlib.contextmanager
def _using_split(plan: Plan, variant: Any) -> Iterator[None]:
    """``plan.split`` set to ``variant`` (e.g. the split without fused pairs) for the block, then restored."""
    split, plan.split = plan.split, variant
    try:
        yield
    finally:
        plan.split = split


def _workers(plan: Plan) -> int:
    return plan.workers or os.cpu_count() or 1


def _probe(plan: Plan, n_samples: int, vectorized: bool = True) -> tuple[Any, int, str, bool]:
    """The fastest configuration: ``(strategy, copies, reason, unfused)``; ``unfused``: run the split's variant
    without fused pairs (PyTorch: the per-channel tables only pay with enough copies per pass)."""
    budget, limits, _ = _limits(plan, n_samples)
    split, plain = plan.split, (plan.split.unfused if plan.split is not None else None)

    def is_plain(variant: Any) -> bool:
        return plain is not None and variant is plain

    timings: dict[str, float] = {}
    configs: dict[str, tuple[Any, int, bool]] = {}

    def timed(strategy: Any, copies: int, name: str, variant: Any = split) -> float:
        with _using_split(plan, variant):
            seconds = min(timings.get(name, float("inf")), _time_per_sample(strategy, plan, copies))
        timings[name], configs[name] = seconds, (strategy, copies, is_plain(variant))
        return seconds

    # A seeded call only compares configurations that return the same samples (per-sample random streams).
    # Vectorized runs the whole model per copy: with a split, prefix does the same work minus the prefix with
    # cheaper masks, and wins unless the whole pass is tiny (then per-sample mask overhead decides). So with a
    # split, vectorized is probed only for passes under TINY_PASS_SECONDS per sample (every probe leaves
    # allocator and BLAS buffers behind). The check's loop timing counts as the first scan's.
    families: list[tuple[Any, int, Any]] = []  # (strategy, most copies per pass, split variant)
    if vectorized and not plan.seeded and (plan.split is None or timed(LoopStrategy(), 1, "loop") < TINY_PASS_SECONDS):
        families.append((VectorizedStrategy(), limits["vectorized"], split))
    if plan.split is not None:
        families.append((PrefixStrategy(), limits["prefix"], split))
        if plain is not None:  # same samples up to rounding: also fine for a seeded call
            with _using_split(plan, plain):
                families.append((PrefixStrategy(), _prefix_limit(plan, budget, n_samples)[0], plain))
        if _workers(plan) > 1 and not plan.split.native_rng:
            families.append((ParallelStrategy(), limits["parallel"], split))
    # Two scans, each configuration keeping its faster time: a process's first second of work runs slower
    # and erratically (allocator and thread-pool warm-up), which one scan would bake into a choice that is
    # cached for good.
    scanned = [family for family in families if family[0].name != "parallel"]
    threaded = [family for family in families if family[0].name == "parallel"]

    def behind(name: str) -> bool:  # far behind the best already: not worth timing again
        return name in timings and timings[name] > RESCAN_FACTOR * min(timings.values())

    for scan in range(PROBE_SCANS):
        if not plan.seeded and not (behind("loop") if scan else "loop" in timings):
            timed(LoopStrategy(), 1, "loop")
        for strategy, limit, variant in scanned:
            if is_plain(variant) and _fused_runs_many_copies(timings, configs):
                continue  # the tables already pay at that many copies per pass: the unfused split cannot win much
            previous, worse = float("inf"), 0
            # powers of two, and the limit itself (all samples in one pass when the budget allows it), each as
            # the block size the call will really run (100 samples at 32 copies: 4 blocks of 25). Largest first:
            # the biggest blocks then run before the other sizes' allocator and library caches have piled up,
            # and the family stops two sizes past its best (fewer probes: less first-call time and memory).
            sizes = {c for c in _COPIES if c <= limit} | ({limit} if limit <= _COPIES[-1] else set())
            for copies in sorted({block_sizes(n_samples, c)[0] for c in sizes}, reverse=True):
                name = f"{strategy.name}{'-unfused' if is_plain(variant) else ''}x{copies}"
                if scan and behind(name):
                    seconds = timings[name]
                else:
                    seconds = timed(strategy, copies, name, variant)
                worse = worse + 1 if seconds > 1.2 * previous else 0
                if worse == 2:  # twice past the family's best (not one noisy run): stop
                    break
                previous = min(previous, seconds)
        for strategy, limit, _ in threaded:
            # Worker threads only where a block is long enough to amortise handing it to a thread, at the best
            # single-thread block size shared between the workers and twice that: every block size a worker
            # allocates stays in its allocator arena, so a full scan of sizes would cost memory for good.
            single = min((n for n in timings if n.startswith("prefixx")), key=timings.__getitem__, default=None)
            if single is None or timings[single] * configs[single][1] < PARALLEL_MIN_BLOCK_SECONDS:
                continue
            share = max(1, min(limit, configs[single][1] // _workers(plan)))
            for copies in sorted({share, min(limit, 2 * share)}):
                name = f"{strategy.name}x{copies}"
                if scan and behind(name):
                    continue
                timed(strategy, copies, name)
    name = min(timings, key=timings.__getitem__) if timings else "prefixx1"
    strategy, copies, unfused = configs.get(name, (PrefixStrategy(), 1, False))
    top = sorted(timings.items(), key=lambda kv: kv[1])[:4]
    summary = ", ".join(f"{name} {1e3 * t:.3g} ms" for name, t in top)
    reason = (f"fastest in a probe of {len(timings)} configurations (per sample: {summary}); "
              f"memory budget {budget / 2**20:.0f} MB; cached for this model and input shape")
    return strategy, copies, reason, unfused


def _fused_runs_many_copies(timings: dict[str, float], configs: dict[str, tuple]) -> bool:
    """Whether the fastest fused-split prefix configuration so far runs at least UNFUSED_PROBE_COPIES copies
    per pass (then the unfused variant is not probed: it only wins with few copies, and a probe leaves allocator
    and library caches behind)."""
    fused = [name for name in timings if name.startswith("prefixx")]
    return bool(fused) and configs[min(fused, key=timings.__getitem__)][1] >= UNFUSED_PROBE_COPIES


def prepare(plan: Plan, requested: str, n_samples: int, mode: str) -> tuple[Any, str]:
    """Resolve ``requested`` (a name or ``"auto"``) to a ready strategy; returns it with a reason.

    Runs inside MC mode and the precision context, before the session's seeding.
    """
    if mode == "training":
        if requested not in ("auto", "loop"):
            raise InputError(
                f"strategy: {requested!r} is not exact with mode='training' (BatchNorm batch statistics would mix "
                "the repeated copies); expected strategy='loop' or 'auto'."
            )
        return LoopStrategy(), "mode='training': batch statistics depend on the batch, so only separate passes are exact"
    if requested != "auto":
        strategy, reason = _explicit(plan, requested)
        problem = _stacking_problem(plan, strategy)
        if problem:
            return LoopStrategy(), f"{requested!r} requested, but {problem}: ran 'loop'"
        return strategy, _within_budget(plan, strategy, reason, n_samples)
    why = _attach_split(plan)
    split_problem = _stacking_problem(plan, PrefixStrategy()) if plan.split is not None else None
    if split_problem:
        plan.split, why = None, split_problem
    stacking = _stacking_problem(plan, VectorizedStrategy())
    if stacking and plan.split is None:
        return LoopStrategy(), f"{stacking}: only separate passes are exact"
    per_sample_rng = plan.split is not None and not plan.split.native_rng
    if plan.seeded and not per_sample_rng:
        # Timing must not decide what a seeded call returns: a fixed configuration instead of a probe.
        # The memory budget depends on shapes and weights only, so capping by it keeps the choice reproducible.
        strategy = PrefixStrategy() if plan.split is not None else VectorizedStrategy()  # (stacking checked above)
        reason = (f"seeded call: {strategy.name} with the default rows per pass, chosen without timing (these "
                  "dropout layers draw from a shared random state, so a timed choice could change the samples)")
        return strategy, _within_budget(plan, strategy, reason, n_samples) + _split_note(plan, why)
    if n_samples == 1:
        return (PrefixStrategy(), f"one sample; split: {why}") if plan.split else (LoopStrategy(), "one sample")
    key = (*_key(plan, n_samples), stacking)
    cache = _cache.setdefault(plan.model, {})
    if key not in cache:
        cache[key] = _isolated(plan, lambda: _probe(plan, n_samples, vectorized=not stacking))
    strategy, copies, reason, unfused = cache[key]
    plan.copies = copies
    if unfused and plan.split.unfused is not None:  # a flag, not the object: splits get rebuilt
        plan.split = plan.split.unfused
        why = f"{plan.split.description}; channel dropout + convolution pairs not fused (faster at {copies} copies)"
    return strategy, f"{strategy.name} with {copies} copies per pass: {reason}{_split_note(plan, why)}"


def _stacking_problem(plan: Plan, strategy: Any) -> str | None:
    """Why ``strategy`` stacking copies of the batch in one pass would not be exact (None: it is), as the
    backend sees it: e.g. a Keras dropout whose ``noise_shape`` shares one mask across the batch axis would
    share it across the copies too, unless the split draws that layer's masks per sample."""
    if strategy.name == "loop":
        return None
    return plan.backend.stacking_problem(plan.model, plan.split if strategy.name in _SPLIT_STRATEGIES else None)


def _split_note(plan: Plan, why: str) -> str:
    return f"; split: {why}" if plan.split is not None else f"; no split ({why})"
