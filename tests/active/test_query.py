"""``mcu.active.query``: top-k order and ties, determinism, chunking, pool containers, errors."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

import mcu
from mcu.active import query, querying
from mcu.active.acquisition import bald, entropy
from mcu.errors import InputError
from tests.conftest import require_backend, require_module


def tiny_model(backend: str, p: float = 0.5, n_in: int = 4, n_out: int = 3):
    """A small MLP with dropout: n_in -> 16 -> n_out logits."""
    if backend == "torch":
        import torch

        torch.manual_seed(0)
        nn = torch.nn
        return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, n_out))
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    return keras.Sequential([keras.Input((n_in,)), L.Dense(16, activation="relu"), L.Dropout(p), L.Dense(n_out)])


def dead_dropout_model(n_in: int = 4, n_out: int = 3):
    """A torch MLP whose only dropout acts on zeros: MC sampling runs, yet every sample is identical (rate-0
    dropout is not dropout, so that cannot be the way to get a deterministic model)."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn

    class DeadDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = nn.Dropout(0.5)

        def forward(self, h):
            return h + self.d(torch.zeros_like(h))

    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out), DeadDropout())


def pool(n: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_model():
    require_backend("torch")
    return tiny_model("torch")


def test_top_k_matches_scoring_the_whole_pool_at_once(backend):
    model, x = tiny_model(backend), pool()
    indices, scores = query(model, x, 7, heuristic="bald", n_samples=8, batch_size=64, seed=3, progress=False)
    samples = mcu.sample(model, x, 8, seed=querying.derive_seed(3, 0))  # one chunk: chunk 0's seed
    full = bald(samples, from_logits=True)
    expected = np.lexsort((np.arange(len(x)), -full))[:7]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, full[expected])
    assert indices.dtype == np.int64 and scores.dtype == np.float64


def test_same_seed_same_answer_and_scores_sorted(torch_model):
    x = pool(80)
    a = query(torch_model, x, 10, n_samples=6, batch_size=16, seed=1, progress=False)
    b = query(torch_model, x, 10, n_samples=6, batch_size=16, seed=1, progress=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.all(np.diff(a[1]) <= 0)
    assert len(set(a[0].tolist())) == 10


@pytest.mark.filterwarnings("ignore::mcu.errors.DropoutSiteWarning")
def test_ties_go_to_the_lower_index_across_chunks():
    require_backend("torch")
    model = dead_dropout_model()  # identical samples: every variation ratio is exactly 0
    indices, scores = query(model, pool(30), 8, heuristic="variation_ratio", n_samples=3, batch_size=4, progress=False)
    np.testing.assert_array_equal(indices, np.arange(8))
    np.testing.assert_array_equal(scores, 0.0)


def test_running_top_orders_by_score_then_index():
    top = querying._RunningTop(4, keep_samples=False)
    top.push(np.array([5, 6, 7]), np.array([0.5, 0.9, 0.5]))
    top.push(np.array([1, 2, 9]), np.array([0.5, 0.1, 0.9]))
    assert top.indices.tolist() == [6, 9, 1, 5]
    assert top.scores.tolist() == [0.9, 0.9, 0.5, 0.5]


@pytest.mark.filterwarnings("ignore::mcu.errors.DropoutSiteWarning")
def test_chunk_size_does_not_change_a_deterministic_ranking():
    require_backend("torch")
    model, x = dead_dropout_model(), pool(40)
    expected = np.argsort(-entropy(mcu.sample(model, x, 1), from_logits=True), kind="stable")[:9]
    for batch_size in (1, 7, 40, 1000):
        indices, _ = query(model, x, 9, heuristic="entropy", n_samples=2, batch_size=batch_size, progress=False)
        np.testing.assert_array_equal(indices, expected)


@pytest.mark.parametrize("name", ["entropy", "variation_ratio", "margin", "least_confidence"])
def test_every_pointwise_heuristic_runs(torch_model, name):
    indices, scores = query(torch_model, pool(20), 5, heuristic=name, n_samples=5, seed=0, progress=False)
    assert indices.shape == scores.shape == (5,)
    assert np.all(np.diff(scores) <= 0)


def test_random_does_not_run_the_model_and_is_seeded():
    a = query(None, pool(100), 10, heuristic="random", batch_size=32, seed=5, progress=False)
    b = query(None, pool(100), 10, heuristic="random", batch_size=32, seed=5, progress=False)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], query(None, pool(100), 10, heuristic="random", seed=6, progress=False)[0])


def test_batchbald_returns_distinct_indices_starting_with_the_top_bald_example(torch_model):
    x = np.concatenate([pool(30), pool(30)])  # every example twice
    top_bald, _ = query(torch_model, x, 1, n_samples=10, batch_size=1000, seed=2, progress=False)
    indices, gains = query(torch_model, x, 6, heuristic="batchbald", n_samples=10, batch_size=1000, seed=2,
                           progress=False, n_candidates=20)
    assert len(set(indices.tolist())) == 6
    assert indices[0] == top_bald[0]
    assert np.all(gains[1:] <= gains[0] + 1e-12)


def test_batchbald_keeps_only_a_bounded_candidate_set(torch_model, monkeypatch):
    seen = {}
    real = querying.batch_bald

    def spy(samples, k, **kwargs):
        seen["shape"] = samples.shape
        return real(samples, k, **kwargs)

    monkeypatch.setattr(querying, "batch_bald", spy)
    query(torch_model, pool(300), 3, heuristic="batchbald", n_samples=4, batch_size=50, seed=0, progress=False)
    assert seen["shape"] == (4, 256, 3)  # min(pool, max(4k, 256)) candidates


def test_subset_restricts_the_candidates(torch_model):
    subset = [3, 10, 11, 40, 41, 42]
    indices, _ = query(torch_model, pool(50), 4, subset=subset, n_samples=4, seed=0, progress=False)
    assert set(indices.tolist()) <= set(subset)


@pytest.mark.parametrize("k", [0, 51, -1, 2.5])
def test_k_outside_the_pool_is_rejected(k):
    with pytest.raises(InputError, match="k: expected"):
        query(None, pool(50), k, heuristic="random", progress=False)


def test_k_larger_than_the_subset_is_rejected():
    with pytest.raises(InputError, match="at most the 2 examples"):
        query(None, pool(50), 3, heuristic="random", subset=[1, 2], progress=False)


def test_unknown_heuristic_lists_the_valid_names():
    with pytest.raises(InputError, match="expected one of bald, batchbald"):
        query(None, pool(5), 1, heuristic="max_entropy")


def test_progress_bar_with_and_without_tqdm(monkeypatch):
    args = (None, pool(40), 3)
    expected = query(*args, heuristic="random", batch_size=8, seed=0, progress=False)
    shown = query(*args, heuristic="random", batch_size=8, seed=0, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    hidden = query(*args, heuristic="random", batch_size=8, seed=0, progress=True)
    for got in (shown, hidden):
        np.testing.assert_array_equal(got[0], expected[0])


# -- pool containers -------------------------------------------------------------------------------------------


def _numpy_answer(model, x, **kwargs):
    return query(model, x, 5, n_samples=4, batch_size=8, seed=4, progress=False, **kwargs)


def test_torch_dataset_and_dataloader_pools_match_the_numpy_pool(torch_model):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x = pool(37)
    expected = _numpy_answer(torch_model, x)
    dataset = TensorDataset(torch.from_numpy(x), torch.zeros(37))  # items are (x, y)
    x_only = TensorDataset(torch.from_numpy(x))  # items are (x,)
    loaders = (DataLoader(dataset, batch_size=5), DataLoader(x_only, batch_size=16), DataLoader(x_only, batch_size=None))
    for container in (dataset, *loaders):
        got = _numpy_answer(torch_model, container)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)


def test_shuffled_or_truncated_dataloader_is_rejected(torch_model):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.from_numpy(pool(10)))
    with pytest.raises(InputError, match="shuffle=False"):
        _numpy_answer(torch_model, DataLoader(dataset, shuffle=True))
    with pytest.raises(InputError, match="drop_last"):
        _numpy_answer(torch_model, DataLoader(dataset, batch_size=3, drop_last=True))


def test_tf_data_pool_matches_the_numpy_pool(torch_model):
    tf = require_module("tensorflow")  # tf.data itself, not only the Keras backend (which may run on JAX)

    x = pool(23)
    expected = _numpy_answer(torch_model, x)
    for dataset in (tf.data.Dataset.from_tensor_slices((x, np.zeros(23))), tf.data.Dataset.from_tensor_slices(x)):
        got = _numpy_answer(torch_model, dataset)
        np.testing.assert_array_equal(got[0], expected[0])
    filtered = tf.data.Dataset.from_tensor_slices(x).filter(lambda row: True)  # unknown cardinality
    np.testing.assert_array_equal(_numpy_answer(torch_model, filtered)[0], expected[0])


def test_unsupported_pool_is_rejected():
    with pytest.raises(InputError, match="pool: expected a numpy array"):
        query(None, object(), 1, heuristic="random")


def test_mcu_active_query_is_the_function_and_no_module():
    assert mcu.active.query is query is querying.query and callable(query)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("mcu.active.query")
