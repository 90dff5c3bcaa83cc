"""The article's PyTorch ``MCNet`` and ``get_uncertainty``, rewritten with mcu, on real digits.

The article's recipe puts the whole model in training mode (``model.train()``) and stacks ``n_samples``
forward passes. With mcu the model stays in eval mode and only its dropout layers sample: ``mcu.sample``
returns the ``(T, N, 10)`` outputs as numpy, and the article's uncertainty (their standard deviation over
the samples) is one line. ``mcu.predict`` gives the per-example summaries (entropy, mutual information, ...)
without holding the samples.

MCNet keeps its shape 784-512-10: scikit-learn's 8x8 digits are upsampled to 28x28 (each pixel repeated
3x3 -> 24x24, plus a zero border of 2), flattened to 784 values.

Run: python examples/mcnet_torch.py [--epochs N] [--samples T] [--seed S]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.special import softmax

import mcu
from mcu.demo import data, models
from mcu.metrics import auroc


class MCNet(torch.nn.Module):  # the article's model, unchanged
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 512)
        self.dropout = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(512, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = self.dropout(x)  # active only while sampling: mcu switches dropout on, nothing else
        return self.fc2(x)


def get_uncertainty(model, x, n_samples=50, seed=None):
    """The article's ``get_uncertainty``: the std of the outputs over ``n_samples`` MC-dropout passes, (N, 10).

    Article version, for comparison::

        def get_uncertainty(model, x, n_samples=50):
            model.train()  # every layer in training mode (BatchNorm too), and left that way
            with torch.no_grad():
                outputs = torch.stack([model(x) for _ in range(n_samples)])
            return outputs.std(dim=0)
    """
    return mcu.sample(model, x, n_samples, seed=seed).std(axis=0, ddof=1)  # torch's std is unbiased (ddof=1)


def run(seed: int = 0, n_samples: int = 50, epochs: int = 20) -> dict:
    """Train MCNet on upsampled digits; return its uncertainties and how well they flag its mistakes."""
    split = data.digits_pool(seed)
    x_train, x_test = data.upsample_28(split.x_pool), data.upsample_28(split.x_test)
    torch.manual_seed(seed)
    model = models.train_classifier("torch", x_train, split.y_pool, 10, seed=seed, epochs=epochs, model=MCNet())

    std = get_uncertainty(model, x_test, n_samples, seed=seed)  # (N, 10), spread of the logits
    assert not model.training  # the model is left as it was: eval mode
    probs = softmax(mcu.sample(model, x_test, n_samples, seed=seed), axis=-1)  # (T, N, 10)
    prob_std = probs.std(axis=0, ddof=1).mean(axis=1)  # the same spread, of the probabilities
    pred = mcu.predict(model, x_test, n_samples, seed=seed)  # streaming summaries per example
    wrong = pred.label != split.y_test
    score = std.mean(axis=1)  # one number per example: the article's spread, averaged over the 10 outputs
    mi = pred.mutual_information
    return {
        "model": model, "prediction": pred, "std": std, "accuracy": float(np.mean(~wrong)), "n_wrong": int(wrong.sum()),
        # do the uncertainties rank the model's mistakes above its correct answers? (0.5 = chance)
        "auroc_std": auroc(score[wrong], score[~wrong]) if wrong.any() else float("nan"),
        "auroc_prob_std": auroc(prob_std[wrong], prob_std[~wrong]) if wrong.any() else float("nan"),
        "auroc_mi": auroc(mi[wrong], mi[~wrong]) if wrong.any() else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with models.single_thread("torch"):
        result = run(args.seed, args.samples, args.epochs)
    print(f"MCNet (784-512-10, dropout 0.5) on upsampled digits: test accuracy {result['accuracy']:.3f} "
          f"({result['n_wrong']} mistakes)")
    print(f"get_uncertainty -> {result['std'].shape}; mean std of the logits {result['std'].mean():.3f}")
    print("Do the uncertainties rank the mistakes above the correct answers? AUROC (0.5 = chance):")
    print(f"  std of the logits (the article's get_uncertainty) {result['auroc_std']:.3f}  <- logits have no common "
          "scale: confident answers have large logits that also spread widely")
    print(f"  std of the probabilities {result['auroc_prob_std']:.3f}; mutual information {result['auroc_mi']:.3f}")
    print(result["prediction"].table(max_rows=8))


if __name__ == "__main__":
    main()
