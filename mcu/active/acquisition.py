"""Acquisition scores for active learning, computed from MC-dropout samples ``(T, N, C)``.

Every score follows one convention: **higher means more uncertain, so query it first**. Pointwise heuristics
return one score per example ``(N,)``; :func:`batch_bald` chooses a whole batch at once, so that the examples
it picks are jointly informative rather than near-duplicates of one another.

``from_logits`` is always explicit: ``True`` when ``samples`` are raw network outputs, ``False`` when they
are probabilities (rows summing to one). The pointwise scores are thin wrappers over :mod:`mcu.metrics`.

Example:
    >>> import numpy as np
    >>> from mcu.active import acquisition
    >>> agree = np.tile([[[0.9, 0.1]]], (4, 1, 1))            # 4 identical samples, 1 example, 2 classes
    >>> float(acquisition.bald(agree, from_logits=False)[0])  # no disagreement: no information to gain
    0.0
    >>> sorted(acquisition.HEURISTICS)
    ['bald', 'batchbald', 'entropy', 'least_confidence', 'margin', 'random', 'variation_ratio']
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from scipy.special import entr, softmax

from mcu.errors import InputError
from mcu.metrics import classification as metrics
from mcu.metrics.classification import probabilities_and_entropies

__all__ = [
    "HEURISTICS",
    "SCORES",
    "bald",
    "batch_bald",
    "entropy",
    "get_heuristic",
    "least_confidence",
    "margin",
    "random",
    "variation_ratio",
]

#: Working-memory cap of :func:`batch_bald`: candidates are scored in chunks of at most this many
#: ``(candidate, configuration, class)`` float64 cells (32 MiB).
_MAX_CELLS = 1 << 22


def entropy(samples: np.ndarray, *, from_logits: bool) -> np.ndarray:
    """Predictive entropy ``H[mean_t p_t]``: total uncertainty (aleatoric + epistemic), in nats.

    Shape:
        samples: ``(T, N, C)`` -> ``(N,)``, in ``[0, log C]``.

    Example:
        >>> uniform = np.full((3, 1, 4), 0.25)
        >>> bool(np.isclose(entropy(uniform, from_logits=False)[0], np.log(4)))
        True
    """
    return metrics.predictive_entropy(samples, from_logits=from_logits)


def bald(samples: np.ndarray, *, from_logits: bool) -> np.ndarray:
    """BALD (Houlsby et al. 2011): mutual information ``H[mean_t p_t] - mean_t H[p_t]`` between label and weights.

    High when the dropout samples disagree (epistemic uncertainty), zero when they are identical.

    Shape:
        samples: ``(T, N, C)`` -> ``(N,)``, in ``[0, log C]``.

    Example:
        >>> disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])    # two confident samples that disagree
        >>> bool(np.isclose(bald(disagree, from_logits=False)[0], np.log(2)))
        True
    """
    return metrics.mutual_information(samples, from_logits=from_logits)


def variation_ratio(samples: np.ndarray, *, from_logits: bool) -> np.ndarray:
    """Variation ratio ``1 - (votes of the modal class) / T`` of the per-sample argmax predictions.

    Shape:
        samples: ``(T, N, C)`` -> ``(N,)``, in ``[0, 1 - 1/C]``.

    Example:
        >>> votes = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]], [[0.6, 0.4]]])   # 3 votes of 4
        >>> float(variation_ratio(votes, from_logits=False)[0])
        0.25
    """
    return metrics.variation_ratio(samples, from_logits=from_logits)


def margin(samples: np.ndarray, *, from_logits: bool) -> np.ndarray:
    """Margin uncertainty ``1 - (p_(1) - p_(2))``: one minus the gap between the two most probable classes.

    The margin of the mean probabilities is small when the top two classes are close, so it is flipped to
    ``1 - margin`` to keep the convention that a higher score is more uncertain (a tie scores 1).

    Shape:
        samples: ``(T, N, C)`` -> ``(N,)``, in ``[0, 1]``.

    Example:
        >>> float(margin(np.array([[[0.5, 0.5]]]), from_logits=False)[0])
        1.0
    """
    return 1.0 - metrics.margin(samples, from_logits=from_logits)


def least_confidence(samples: np.ndarray, *, from_logits: bool) -> np.ndarray:
    """Least confidence ``1 - max_c mean_t p_t[c]``.

    Shape:
        samples: ``(T, N, C)`` -> ``(N,)``, in ``[0, 1 - 1/C]``.

    Example:
        >>> float(least_confidence(np.array([[[0.75, 0.25]]]), from_logits=False)[0])
        0.25
    """
    return 1.0 - metrics.max_probability(samples, from_logits=from_logits)


def random(samples: np.ndarray, *, from_logits: bool = False, seed: int | None = None) -> np.ndarray:
    """Uniform random scores in ``[0, 1)``: the baseline every heuristic must beat. Only ``N`` is used.

    Args:
        samples: array whose second axis is ``N`` (its values and ``from_logits`` are ignored).
        from_logits: accepted so that every heuristic has the same signature; ignored.
        seed: makes the scores reproducible.

    Shape:
        samples: ``(T, N, ...)`` -> ``(N,)``.

    Example:
        >>> a = random(np.zeros((2, 3, 4)), seed=0)
        >>> a.shape, bool(np.array_equal(a, random(np.zeros((2, 3, 4)), seed=0)))
        ((3,), True)
    """
    samples = np.asarray(samples)
    if samples.ndim < 2:
        raise InputError(f"samples: expected shape (T, N, ...) with the samples axis first, got {samples.shape}.")
    return uniform_scores(samples.shape[1], seed)


def uniform_scores(n: int, seed: int | None) -> np.ndarray:
    """``n`` uniform scores in ``[0, 1)`` from a generator seeded with ``seed`` (shared by :func:`random`)."""
    return np.random.default_rng(seed).random(n)


def batch_bald(
    samples: np.ndarray,
    k: int,
    *,
    from_logits: bool,
    max_configurations: int = 2048,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BatchBALD (Kirsch et al. 2019): greedily pick ``k`` examples maximising the joint mutual information.

    The batch value is ``a(B) = H[y_B] - E_w H[y_B | w]`` where the second term is the sum of the examples'
    expected entropies (labels are independent given the weights). Step ``i`` adds the example with the
    largest gain ``a(B + x) - a(B) = E_{ŷ_B}[H(y_x | ŷ_B)] - E_w H[y_x | w]``: the information ``x`` adds
    *given the labels of the examples already chosen*. A duplicate of a chosen example gains nothing.

    The expectation over the labels ``ŷ_B`` of the chosen examples is

    * **exact** while the number of joint label configurations ``C^|B|`` (configurations of probability
      zero dropped) is at most ``max_configurations``: every configuration is enumerated with its
      probability ``p(ŷ_B) = mean_t prod_i p_t(ŷ_i)``;
    * beyond that, the **Monte-Carlo estimator** of Kirsch et al.: ``max_configurations`` configurations
      are drawn from ``p(ŷ_B)`` with a generator seeded by ``seed`` (each one extended label by label from
      ``p(y_x | ŷ_B)`` as the batch grows) and the expectation becomes their average.

    Each configuration is stored as normalised weights over the ``T`` samples (the posterior of the sample
    given ``ŷ_B``), so products of many small probabilities never underflow. Memory is ``O(T·K + N·C·T)``
    for ``K = max_configurations`` plus a working buffer of at most ``2**22`` cells: candidates are scored in
    chunks.

    Args:
        samples: MC-dropout outputs of the candidates.
        k: batch size, ``1 <= k <= N``.
        from_logits: whether ``samples`` are logits (``True``) or probabilities (``False``).
        max_configurations: the exact/sampled switch point and the number of sampled configurations.
        seed: seeds the configuration sampling (used only past the exact regime).

    Returns:
        ``(indices, gains)``: candidate indices in the order chosen and the gain of each step. Gains are
        non-increasing in the exact regime (the objective is submodular); ``gains[0]`` is the largest BALD
        score and ``np.cumsum(gains)`` is the BatchBALD value of each prefix of the batch.

    Shape:
        samples: ``(T, N, C)`` -> indices ``(k,)``, gains ``(k,)``.

    Example:
        >>> a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])   # 4 samples that disagree
        >>> b = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])   # less informative, independent
        >>> samples = np.stack([a, a, b], axis=1)                            # examples: a, a copy of a, b
        >>> batch_bald(samples, 2, from_logits=False)[0].tolist()          # top-2 BALD would pick 0 and 1
        [0, 2]
    """
    probs, entropies = probabilities_and_entropies(samples, from_logits)  # validated, float64
    expected = entropies.mean(axis=0)  # E_w H[y_x | w], (N,)
    n = probs.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise InputError(f"k: expected an integer in [1, {n}] (the number of candidates), got {k!r}.")
    if isinstance(max_configurations, bool) or not isinstance(max_configurations, int) or max_configurations < 1:
        raise InputError(f"max_configurations: expected an integer >= 1, got {max_configurations!r}.")
    joint = _JointLabels(probs.shape[0], max_configurations, np.random.default_rng(seed))
    chosen = np.zeros(n, dtype=bool)
    indices, gains = np.empty(k, dtype=np.int64), np.empty(k)
    for step in range(k):
        gain = joint.conditional_entropy(probs) - expected
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))  # ties: the lowest index
        indices[step], gains[step], chosen[best] = best, gain[best], True
        joint.add(probs[:, best])
    return indices, gains


class _JointLabels:
    """Label configurations ``ŷ_B`` of the chosen examples, each as a posterior over the ``T`` samples.

    ``log_weights[t, j] = log prod_i p_t(ŷ_ij)`` (up to a per-column constant) and ``mass[j]`` is the weight
    of configuration ``j`` in the expectation: its probability (exact) or ``1/K`` (sampled).
    """

    def __init__(self, n_samples: int, max_configurations: int, rng: np.random.Generator) -> None:
        self.log_weights = np.zeros((n_samples, 1))
        self.mass = np.ones(1)
        self.max_configurations = max_configurations
        self.rng = rng
        self.sampled = False

    def posterior(self) -> np.ndarray:
        """``(T, K)`` weights ``p(w_t | ŷ_j)``, each column summing to one."""
        return softmax(self.log_weights, axis=0)

    def conditional_entropy(self, probs: np.ndarray) -> np.ndarray:
        """``E_j[H(y_x | ŷ_j)]`` for every candidate ``x``; ``probs`` is ``(T, N, C)``, the result ``(N,)``."""
        posterior = self.posterior()
        n, k, c = probs.shape[1], posterior.shape[1], probs.shape[2]
        step = max(1, _MAX_CELLS // (k * c))
        out = np.empty(n)
        for start in range(0, n, step):
            chunk = probs[:, start : start + step]
            conditional = (posterior.T @ chunk.reshape(len(chunk), -1)).reshape(k, -1, c)  # p(y_x | ŷ_j)
            out[start : start + step] = self.mass @ entr(conditional).sum(-1)
        return out

    def add(self, p: np.ndarray) -> None:
        """Extend every configuration with the label of a newly chosen example, ``p`` of shape ``(T, C)``."""
        conditional = self.posterior().T @ p  # (K, C): p(y | ŷ_j)
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
        k, c = conditional.shape
        if not self.sampled and k * c <= self.max_configurations:
            mass = (self.mass[:, None] * conditional).ravel()
            keep = mass > 0
            self.log_weights = (self.log_weights[:, :, None] + log_p[:, None, :]).reshape(len(p), -1)[:, keep]
            self.mass = mass[keep] / mass[keep].sum()
            return
        m = self.max_configurations
        parents = np.arange(k) if self.sampled else self.rng.choice(k, size=m, p=self.mass)
        cumulative = np.cumsum(conditional[parents], axis=1)
        draws = self.rng.random(len(parents))[:, None] * cumulative[:, -1:]
        labels = np.minimum((cumulative <= draws).sum(axis=1), c - 1)
        self.log_weights = self.log_weights[:, parents] + log_p[:, labels]
        self.mass = np.full(len(parents), 1.0 / len(parents))
        self.sampled = True


#: Pointwise heuristics: ``score(samples, *, from_logits) -> (N,)``, higher is more uncertain.
SCORES: dict[str, Callable[..., np.ndarray]] = {
    "bald": bald,
    "entropy": entropy,
    "least_confidence": least_confidence,
    "margin": margin,
    "random": random,
    "variation_ratio": variation_ratio,
}

#: Every heuristic by name: the pointwise ones and the batch-aware ``"batchbald"``
#: (``batch_bald(samples, k, *, from_logits, ...) -> (indices, gains)``).
HEURISTICS: dict[str, Callable[..., Any]] = {**SCORES, "batchbald": batch_bald}


def get_heuristic(name: str) -> Callable[..., Any]:
    """The heuristic registered under ``name``; an :class:`~mcu.errors.InputError` lists the valid names.

    Example:
        >>> get_heuristic("bald") is bald
        True
    """
    try:
        return HEURISTICS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(HEURISTICS))
        raise InputError(f"heuristic: unknown heuristic {name!r}; expected one of {valid}.") from None
