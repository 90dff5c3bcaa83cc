"""A small transformer text classifier with MC-dropout uncertainty, and the inputs it has never seen.

The task needs no download: "documents" of 16 tokens ("words") from a 64-word vocabulary, in two topics.
Words 2..9 are common to both topics; each position holds, with probability 0.15, a word of the document's
topic instead (words 10..17 for topic 0, 18..25 for topic 1). A few documents have almost no topic words, so
the task has some genuine ambiguity (aleatoric uncertainty). Words 26..63 never occur in training.

The model is what PyTorch users write: token and position embeddings, ``nn.TransformerEncoder`` of
``nn.TransformerEncoderLayer`` (``batch_first=True``, dropout 0.1 on the attention weights, after the
attention and in the feed-forward block), mean pooling and a linear head. All its dropout sits inside the
encoder layers, which in ``eval()`` mode take a fused fast path without dropout. It is trained, put in
``eval()`` mode, and :func:`mcu.predict` draws T MC-dropout samples per document with every one of those
dropout sites on, while the model itself stays untouched (still in eval mode afterwards).

Unseen inputs, scored by the mutual information (epistemic uncertainty) and the predictive entropy:

1. **Unseen words**: documents written in the part of the vocabulary never used in training (words 26..63,
   whose embeddings are still the random initial ones), like text in another language.
2. **Off-topic**: documents of common words only (2..9), with no topic word: a pattern never seen.

The AUROC says how well each score tells those inputs from held-out test documents (0.5 = chance). A check
compares the spread of mcu's samples with the literal ``model.train()`` loop (T forward passes with every
dropout on, on a copy of the model): the ratio is about 1, up to Monte Carlo noise.

Run: python examples/text_classifier_uncertainty.py [--out DIR] [--samples T] [--epochs E] [--seed S]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mcu
from mcu.demo.models import single_thread
from mcu.demo.report import pyplot
from mcu.metrics import auroc, mutual_information

VOCAB, LENGTH, TOPIC_RATE = 64, 16, 0.15
COMMON, TOPICS, UNSEEN = np.arange(2, 10), (np.arange(10, 18), np.arange(18, 26)), np.arange(26, VOCAB)


def make_documents(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` documents ``(n, LENGTH)`` int64 and their topics (0 or 1)."""
    y = rng.integers(0, 2, n)
    topic_words = np.where(y[:, None] == 0, rng.choice(TOPICS[0], (n, LENGTH)), rng.choice(TOPICS[1], (n, LENGTH)))
    common = rng.choice(COMMON, (n, LENGTH))
    return np.where(rng.random((n, LENGTH)) < TOPIC_RATE, topic_words, common).astype(np.int64), y


def unseen_documents(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The two kinds of input never seen in training (see the module docstring)."""
    return {"unseen words": rng.choice(UNSEEN, (n, LENGTH)).astype(np.int64),
            "off-topic": rng.choice(COMMON, (n, LENGTH)).astype(np.int64)}


class TokenTransformer(nn.Module):
    """Embeddings, a ``batch_first`` encoder of ``nn.TransformerEncoderLayer`` blocks, mean pooling, a head."""

    def __init__(self, d_model: int = 32, heads: int = 4, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(LENGTH, d_model))
        block = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.position).mean(dim=1))


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch: int = 64, **options) -> TokenTransformer:
    torch.manual_seed(seed)
    model = TokenTransformer(**options)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=order).split(batch):
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def train_loop_samples(model: nn.Module, x: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """The literal MC-dropout loop on a copy of the model: ``train()`` mode, ``n_samples`` passes, logits
    ``(T, N, 2)`` (the reference mcu's samples are checked against; this model has no BatchNorm)."""
    twin = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch.stack([twin(torch.from_numpy(x)) for _ in range(n_samples)]).numpy()


def _probability_spread(logits: np.ndarray) -> float:
    """The article's convergence statistic: mean over examples of the std over samples of the probabilities."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return float((p / p.sum(-1, keepdims=True)).std(axis=0).mean())


def run(seed: int = 0, n_samples: int = 30, epochs: int = 5, n_train: int = 1000, n_test: int = 1000) -> dict:
    rng = np.random.default_rng(seed)
    x_train, y_train = make_documents(n_train, rng)
    x_test, y_test = make_documents(n_test, rng)
    unseen = unseen_documents(n_test, rng)
    start = time.perf_counter()
    model = train(x_train, y_train, seed, epochs)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    test = mcu.predict(model, x_test, n_samples, seed=seed)
    other = {name: mcu.predict(model, x, n_samples, seed=seed + 1 + i) for i, (name, x) in enumerate(unseen.items())}
    predict_s = time.perf_counter() - start
    with torch.no_grad():
        deterministic = model(torch.from_numpy(x_test)).argmax(-1).numpy()

    # mcu's samples against the literal train() loop, on test documents and unseen inputs
    check = np.concatenate([x_test[:200], unseen["unseen words"][:200]])
    ours = mcu.sample(model, check, n_samples, seed=seed)
    reference = train_loop_samples(model, check, n_samples, seed)
    return {
        "model": model, "x_test": x_test, "y_test": y_test, "test": test, "unseen": other,
        "accuracy": float(np.mean(test.label == y_test)),
        "accuracy_deterministic": float(np.mean(deterministic == y_test)),
        "auroc_mi": {name: auroc(p.mutual_information, test.mutual_information) for name, p in other.items()},
        "auroc_entropy": {name: auroc(p.predictive_entropy, test.predictive_entropy) for name, p in other.items()},
        "spread_ratio": _probability_spread(ours) / _probability_spread(reference),
        "mi_ratio": float(mutual_information(ours, from_logits=True).mean()
                          / mutual_information(reference, from_logits=True).mean()),
        "still_eval": not model.training and not any(m.training for m in model.modules()),
        "n_samples": n_samples, "train_s": train_s, "predict_s": predict_s,
    }


def plot(result: dict, path: Path) -> Path:
    """Histograms of the mutual information and the predictive entropy: test documents vs unseen inputs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title, aucs in ((axes[0], "mutual_information", "mutual information (epistemic)",
                                     result["auroc_mi"]),
                                    (axes[1], "predictive_entropy", "predictive entropy (total)",
                                     result["auroc_entropy"])):
        groups = {"test documents": getattr(result["test"], metric)}
        groups.update({f"{name}: AUROC {aucs[name]:.2f}": getattr(p, metric)
                       for name, p in result["unseen"].items()})
        bins = np.linspace(0, max(v.max() for v in groups.values()) + 1e-9, 40)
        for name, values in groups.items():
            ax.hist(values, bins=bins, alpha=0.55, label=name)
        ax.set_yscale("log")
        ax.set_xlabel(f"{title}, nats (T = {result['n_samples']})")
        ax.set_ylabel("documents")
        ax.legend(fontsize=8)
    fig.suptitle(f"MC dropout on a transformer classifier (test accuracy {result['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", type=Path, help="folder for the plot (default: here)")
    parser.add_argument("--samples", default=30, type=int, help="MC-dropout samples T per document")
    parser.add_argument("--epochs", default=5, type=int)
    parser.add_argument("--seed", default=0, type=int)
    args = parser.parse_args(argv)
    with single_thread("torch"):
        result = run(args.seed, args.samples, args.epochs)
    print(f"trained in {result['train_s']:.1f} s; test accuracy {result['accuracy']:.3f} with the MC-dropout "
          f"mean ({result['accuracy_deterministic']:.3f} with one deterministic pass); "
          f"mcu.predict on {3 * len(result['y_test'])} documents x T={result['n_samples']}: "
          f"{result['predict_s']:.1f} s")
    for name in result["unseen"]:
        print(f"{name:>12} vs test documents: AUROC mutual information {result['auroc_mi'][name]:.3f}, "
              f"predictive entropy {result['auroc_entropy'][name]:.3f}")
    print(f"check against the literal model.train() loop: spread ratio {result['spread_ratio']:.2f}, "
          f"mutual information ratio {result['mi_ratio']:.2f} (about 1 up to Monte Carlo noise); "
          f"model still in eval mode: {result['still_eval']}")
    args.out.mkdir(parents=True, exist_ok=True)
    print("plot:", plot(result, args.out / "text_classifier_uncertainty.png"))


if __name__ == "__main__":
    main()
