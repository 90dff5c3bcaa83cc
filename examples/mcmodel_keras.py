"""The article's Keras ``MCModel`` and ``mc_predict``, rewritten with mcu, on real digits.

The article forces ``training=True`` on the dropout call, so the model is stochastic everywhere, even in
``model.predict``. With mcu the model is an ordinary Keras model (dropout follows ``training``), its normal
predictions stay deterministic, and ``mcu.sample`` switches on only the dropout layers while it samples —
inside subclassed models too. The article's entropy and mutual-information functions (its section 3.1) are
``mcu.metrics.predictive_entropy`` and ``mcu.metrics.mutual_information``.

Input: scikit-learn's 8x8 digits as 64 values (the article does not fix the input size; ``Dense`` adapts).

Run: python examples/mcmodel_keras.py [--epochs N] [--samples T] [--seed S]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import mcu  # noqa: E402
from mcu.demo import data, models  # noqa: E402
from mcu.metrics import (  # noqa: E402
    auroc,
    expected_entropy,
    mean_probabilities,
    mutual_information,
    predictive_entropy,
)


class MCModel(keras.Model):
    """The article's model. Its one change: ``training=training`` instead of ``training=True``."""

    def __init__(self):
        super().__init__()
        self.dense1 = keras.layers.Dense(128, activation="relu")
        self.dropout = keras.layers.Dropout(0.5)
        self.dense2 = keras.layers.Dense(10)

    def call(self, inputs, training=None):
        x = self.dense1(inputs)
        x = self.dropout(x, training=training)  # mcu turns this on while sampling; predict() stays deterministic
        return self.dense2(x)


def mc_predict(model, x, n_samples=100, seed=None):
    """The article's ``mc_predict``: ``n_samples`` stochastic outputs stacked, ``(T, N, 10)`` logits.

    Article version, for comparison::

        def mc_predict(model, x, n_samples=100):
            return np.stack([model(x, training=True) for _ in range(n_samples)], axis=0)
    """
    return mcu.sample(model, x, n_samples, seed=seed)


def run(seed: int = 0, n_samples: int = 100, epochs: int = 30) -> dict:
    """Train MCModel on digits; decompose its uncertainty for correct and wrong answers."""
    split = data.digits_pool(seed)
    keras.utils.set_random_seed(seed)
    model = models.train_classifier("tensorflow", split.x_pool, split.y_pool, 10, seed=seed, epochs=epochs,
                                    model=MCModel())
    samples = mc_predict(model, split.x_test, n_samples, seed=seed)  # (T, N, 10) logits
    total = predictive_entropy(samples, from_logits=True)  # H[mean_t p_t]
    aleatoric = expected_entropy(samples, from_logits=True)  # mean_t H[p_t]
    epistemic = mutual_information(samples, from_logits=True)  # total - aleatoric
    label = mean_probabilities(samples, from_logits=True).argmax(axis=1)  # the answer: argmax of the mean probabilities
    wrong = label != split.y_test
    deterministic = np.asarray(model(split.x_test, training=False))
    return {
        "model": model, "samples": samples, "accuracy": float(np.mean(~wrong)), "n_wrong": int(wrong.sum()),
        "deterministic_repeatable": bool(np.array_equal(deterministic, np.asarray(model(split.x_test)))),
        "groups": {name: {"total": float(total[m].mean()), "aleatoric": float(aleatoric[m].mean()),
                          "epistemic": float(epistemic[m].mean()), "n": int(m.sum())}
                   for name, m in (("correct", ~wrong), ("wrong", wrong)) if m.any()},
        "auroc_mi": auroc(epistemic[wrong], epistemic[~wrong]) if wrong.any() else float("nan"),
        "prediction": mcu.predict(model, split.x_test[:8], n_samples, seed=seed),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args.seed, args.samples, args.epochs)
    print(f"MCModel (Dense 128, Dropout 0.5, Dense 10) on digits: test accuracy {result['accuracy']:.3f} "
          f"({result['n_wrong']} mistakes); mc_predict -> {result['samples'].shape}")
    print(f"model(x) outside mcu is deterministic: {result['deterministic_repeatable']}")
    print("mean uncertainty (nats)   total  aleatoric  epistemic")
    for name, g in result["groups"].items():
        print(f"  {name:8} (n={g['n']:3})    {g['total']:.3f}      {g['aleatoric']:.3f}      {g['epistemic']:.3f}")
    print(f"mutual information ranks mistakes above correct answers: AUROC {result['auroc_mi']:.3f}")
    print("confidence index of the first test digits (mcu.predict):")
    print(result["prediction"].table())


if __name__ == "__main__":
    main()
