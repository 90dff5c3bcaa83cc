"""Active learning on digits: learning curves of BALD and entropy sampling against random, over several seeds.

The article's ``query_uncertain_samples`` (T MC-dropout passes, entropy of the mean probabilities, the k
highest) is one call of ``mcu.active.query``. The loop — query, label, retrain from scratch, evaluate — is
``mcu.active.ActiveLearningLoop``; the oracle answers from the hidden pool labels. The loop never touches
the model itself (only through ``retrain``, ``evaluate`` and ``mcu.active.query``), so the same code runs
with a PyTorch and with a Keras model: ``--backend``.

Criterion: for each heuristic, the mean test accuracy over the query rounds 1..R (the normalised area under
the learning curve, the shared starting point excluded), averaged over the seeds. BALD and entropy sampling
are better than random when theirs is higher.

Run: python examples/active_learning_digits.py [--backend torch|tensorflow] [--out DIR] [--seeds N]
     [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mcu.active import ActiveLearningLoop, query
from mcu.demo import data, models

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HEURISTICS = ("bald", "entropy", "random")


def query_uncertain_samples(model, unlabeled_x, T=50, k_samples=10, seed=None):
    """The article's query: the ``k_samples`` examples with the highest predictive entropy over ``T`` passes.

    Returns ``(indices, scores)``, most uncertain first (the article returned them in ascending order).
    """
    return query(model, unlabeled_x, k_samples, heuristic="entropy", n_samples=T, seed=seed, progress=False)


def learning_curve(backend: str, heuristic: str, seed: int, *, rounds: int, query_size: int,
                   initial_per_class: int, n_samples: int, min_steps: int, workdir: Path) -> list[dict]:
    """One active-learning run; its history (``n_labeled``, ``metric`` = test accuracy per round)."""
    split = data.digits_pool(seed)
    start = data.initial_indices(split.y_pool, initial_per_class, seed)

    def retrain(indices, labels):  # from scratch, same seed: the curve reflects the labels only
        return models.train_classifier(backend, split.x_pool[indices], labels, 10, seed=seed, epochs=1,
                                       min_steps=min_steps)

    loop = ActiveLearningLoop(
        split.x_pool, retrain=retrain, evaluate=lambda model: models.accuracy(model, split.x_test, split.y_test),
        state_path=workdir / f"{backend}-{heuristic}-{seed}.json", query_size=query_size,
        oracle=lambda indices: split.y_pool[indices], initial_indices=start, initial_labels=split.y_pool[start],
        heuristic=heuristic, seed=seed, query_options={"n_samples": n_samples, "batch_size": 512},
    )
    return loop.run(max_rounds=rounds + 1)  # round 0 evaluates the starting model


def run(backend: str = "torch", seeds=range(5), rounds: int = 12, query_size: int = 25, initial_per_class: int = 2,
        heuristics=HEURISTICS, n_samples: int = 20, min_steps: int = 300, progress: bool = False) -> dict:
    """Learning curves of every heuristic for every seed, and the area criterion.

    Returns:
        ``n_labeled`` ``(R+1,)``; ``curves[h]`` ``(n_seeds, R+1)`` test accuracies; ``area[h]`` (mean over seeds
        of the mean accuracy over rounds 1..R) and ``area_per_seed[h]``; ``article_query`` (the article's
        function on the first seed's starting model); ``seconds``.
    """
    seeds = list(seeds)
    start_time = time.perf_counter()
    curves: dict[str, list[list[float]]] = {h: [] for h in heuristics}
    n_labeled = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for h in heuristics:
                history = learning_curve(backend, h, seed, rounds=rounds, query_size=query_size,
                                         initial_per_class=initial_per_class, n_samples=n_samples,
                                         min_steps=min_steps, workdir=Path(tmp))
                curves[h].append([r["metric"] for r in history])
                n_labeled = [r["n_labeled"] for r in history]
                if progress:
                    print(f"  seed {seed} {h:8} final accuracy {history[-1]['metric']:.3f} "
                          f"({time.perf_counter() - start_time:.0f} s)", flush=True)
    arrays = {h: np.asarray(c) for h, c in curves.items()}
    split = data.digits_pool(seeds[0])
    first = data.initial_indices(split.y_pool, initial_per_class, seeds[0])
    model = models.train_classifier(backend, split.x_pool[first], split.y_pool[first], 10, seed=seeds[0], epochs=1,
                                    min_steps=min_steps)
    return {
        "backend": backend, "seeds": seeds, "n_labeled": np.asarray(n_labeled), "curves": arrays,
        "area": {h: float(a[:, 1:].mean()) for h, a in arrays.items()},
        "area_per_seed": {h: a[:, 1:].mean(axis=1) for h, a in arrays.items()},
        "final": {h: float(a[:, -1].mean()) for h, a in arrays.items()},
        "article_query": query_uncertain_samples(model, split.x_pool, T=50, k_samples=10, seed=seeds[0]),
        "seconds": time.perf_counter() - start_time,
    }


def plot(result: dict, path: Path) -> Path:
    """Mean learning curve per heuristic with a band of ±1 standard deviation over the seeds."""
    from mcu.demo.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = result["n_labeled"]
    for h, curves in result["curves"].items():
        mean, sd = curves.mean(axis=0), curves.std(axis=0)
        ax.plot(x, mean, marker="o", markersize=3, label=f"{h} (mean accuracy over rounds {result['area'][h]:.3f})")
        ax.fill_between(x, mean - sd, mean + sd, alpha=0.15)
    ax.set_xlabel("labeled examples")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Active learning on digits ({result['backend']}, mean ± sd over {len(result['seeds'])} seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "tensorflow"])
    parser.add_argument("--out", default=".", type=Path)
    parser.add_argument("--seeds", default=5, type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--rounds", default=12, type=int)
    parser.add_argument("--quick", action="store_true", help="3 seeds, 10 rounds (the test's setting)")
    args = parser.parse_args(argv)
    seeds, rounds = (range(3), 10) if args.quick else (range(args.seeds), args.rounds)
    with models.single_thread(args.backend):
        result = run(args.backend, seeds, rounds, progress=True)
    indices, scores = result["article_query"]
    print(f"the article's query_uncertain_samples on the first starting model: indices {indices.tolist()}")
    print(f"learning curves over {len(result['seeds'])} seeds, {len(result['n_labeled']) - 1} rounds "
          f"({result['n_labeled'][0]} -> {result['n_labeled'][-1]} labels), {result['seconds']:.0f} s:")
    for h in result["curves"]:
        per_seed = ", ".join(f"{a:.3f}" for a in result["area_per_seed"][h])
        print(f"  {h:8} mean accuracy over rounds {result['area'][h]:.4f} (per seed {per_seed}); "
              f"final {result['final'][h]:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    print("plot:", plot(result, args.out / "active_learning_digits.png"))


if __name__ == "__main__":
    main()
