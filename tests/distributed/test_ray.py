"""mcu.distributed on a local Ray instance: equality with one machine, a killed worker, top-k, safe loading.

One Ray instance (2 CPUs) serves the whole module. Locally the module is skipped when Ray is not installed;
with ``MCU_REQUIRE_RAY=1`` (CI) a missing Ray fails instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
    if os.environ.get("MCU_REQUIRE_RAY") == "1":
        pytest.fail("MCU_REQUIRE_RAY=1 but ray[data]/pyarrow are not installed: pip install \"mcu[ray]\"",
                    pytrace=False)
    pytest.skip("ray[data] is not installed (pip install \"mcu[ray]\")", allow_module_level=True)

import mcu  # noqa: E402
from mcu.core.predict import batch_seeds  # noqa: E402
from mcu.errors import InputError, NoDropoutError  # noqa: E402
from tests.conftest import require_backend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SENTINEL = 12345.0
FIELDS = ("mean_probabilities", "label", "predictive_entropy", "expected_entropy", "mutual_information",
          "variation_ratio", "margin", "max_probability", "predictive_variance", "n_samples", "standard_error")


# ----------------------------------------------------------------------------- models (imported by workers)


def torch_model():
    """A small classifier: (N, 2, 2) or (N, 4) -> 3 logits, with dropout."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def fragile_model(marker: str):
    """``torch_model`` that kills its worker process the first time it sees the sentinel input."""
    import torch

    class Fragile(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch_model()

        def forward(self, x):
            if bool((x.reshape(len(x), -1)[:, 0] == SENTINEL).any()) and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the worker dies mid-task; the marker lets the retry succeed
            return self.inner(x)

    return Fragile()


def token_model():
    """Token ids + attention mask (by name or in order) -> a tuple (3 class logits, 2 auxiliary outputs)."""
    import torch

    nn = torch.nn

    class TokenClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.drop = nn.Embedding(20, 8), nn.Dropout(0.5)
            self.cls, self.aux = nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
            h = self.drop(torch.relu(pooled))
            return self.cls(h), self.aux(h)

    torch.manual_seed(0)
    return TokenClassifier().eval()


def token_pool(n: int, length: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Integer token ids and a padding mask (1 to ``length`` real tokens per row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 20, size=(n, length))
    mask = (np.arange(length) < rng.integers(1, length + 1, size=(n, 1))).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def no_dropout_model():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4, 3))


def pool(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ray_cluster():
    require_backend("torch")
    import ray

    started = not ray.is_initialized()
    if started:
        pythonpath = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def md(ray_cluster):
    import mcu.distributed

    return mcu.distributed


def assert_same(prediction, reference, fields=FIELDS, tol=1e-6):
    assert len(prediction) == len(reference)
    for name in fields:
        np.testing.assert_allclose(np.asarray(getattr(prediction, name), dtype=np.float64),
                                   np.asarray(getattr(reference, name), dtype=np.float64),
                                   rtol=tol, atol=tol, err_msg=name)


# ------------------------------------------------------------------------------------------ without a cluster


def test_chunk_seeds_are_the_single_machine_batch_seeds():
    from mcu.active.querying import derive_seed
    from mcu.distributed.ray_engine import chunk_seed

    for seed in (0, 7, 2**31 + 5):
        seeds = batch_seeds(seed, 12)
        assert [chunk_seed(seed, c) for c in range(12)] == seeds == [derive_seed(seed, c) for c in range(12)]
    assert chunk_seed(None, 3) is None


def test_importing_mcu_distributed_imports_no_framework_nor_ray():
    code = "import sys, mcu, mcu.distributed; print(sorted({'ray', 'torch', 'tensorflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_actor_threads_follow_the_cpu_allocation(monkeypatch):
    require_backend("torch")
    import torch

    from mcu.distributed.ray_engine import _limit_threads, threads_for

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                 "TF_NUM_INTEROP_THREADS"):
        monkeypatch.setenv(name, "0")  # restored after the test
    before = torch.get_num_threads()
    try:
        _limit_threads(threads_for(1.5))
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    assert threads_for(0.5) == 1 and threads_for(4) == 4


def test_model_sources_are_interpreted_by_form(tmp_path):
    from mcu.distributed import ModelSource

    assert ModelSource.resolve("tests.distributed.test_ray:torch_model").kind == "factory"
    assert ModelSource.resolve(torch_model).kind == "factory"
    assert ModelSource.resolve(str(tmp_path / "m.pt")).kind == "torchscript"
    assert ModelSource.resolve(tmp_path / "m.pt", factory=torch_model).kind == "state_dict"
    assert ModelSource.resolve(str(tmp_path / "m.keras")).kind == "keras"
    with pytest.raises(InputError, match="legacy Keras"):
        ModelSource.resolve(str(tmp_path / "m.h5"))
    with pytest.raises(InputError, match="directory"):
        ModelSource.resolve(str(tmp_path))
    with pytest.raises(InputError, match="cannot be pickled"):
        ModelSource.resolve(functools.partial(torch_model, threading.Lock()))
    with pytest.raises(InputError, match="model: expected a factory"):
        ModelSource.resolve(42)


def test_safe_loading_of_torch_files(tmp_path):
    require_backend("torch")
    import torch

    from mcu.distributed import ModelSource, load_model

    model = torch_model()
    pickled, weights, script = tmp_path / "full.pt", tmp_path / "weights.pt", tmp_path / "script.pt"
    torch.save(model, pickled)  # a pickled full model: loading it could run arbitrary code
    torch.save(model.state_dict(), weights)
    torch.jit.script(model).save(str(script))

    with pytest.raises(InputError, match=r"model: .*full\.pt.*pickled.*torch\.jit\.script.*state_dict"):
        load_model(ModelSource.resolve(str(pickled)))
    with pytest.raises(InputError, match="pickled"):
        load_model(ModelSource.resolve(str(pickled), factory=torch_model))
    with pytest.raises(InputError, match="holds a state_dict.*factory="):
        load_model(ModelSource.resolve(str(weights)))
    with pytest.raises(InputError, match="do not fit the architecture"):
        load_model(ModelSource.resolve(str(weights), factory=no_dropout_model))
    loaded = load_model(ModelSource.resolve(str(weights), factory="tests.distributed.test_ray:torch_model"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert isinstance(load_model(ModelSource.resolve(str(script))), torch.jit.ScriptModule)
    with pytest.raises(InputError, match="not found"):
        load_model(ModelSource.resolve(str(tmp_path / "missing.pt")))


def test_keras_safe_mode_refuses_a_lambda_layer(tmp_path):
    require_backend("tensorflow")
    import keras

    from mcu.distributed import ModelSource, load_model

    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dropout(0.5),
                              keras.layers.Dense(3)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(InputError, match=r"model: .*lambda\.keras.*safe_mode.*register_keras_serializable"):
        load_model(ModelSource.resolve(str(path)))


# --------------------------------------------------------------------------------------------- on the cluster


def test_predict_equals_single_machine_whatever_the_workers(md, tmp_path):
    x = pool(700)
    reference = mcu.predict(torch_model(), x, 12, seed=11, batch_size=64, strategy="vectorized")
    run = md.predict("tests.distributed.test_ray:torch_model", x, 12, output=tmp_path / "out", seed=11,
                     batch_size=64, strategy="vectorized", num_workers=2, chunks_per_task=3)
    assert (run.n_items, run.n_batches, run.n_tasks, run.num_workers, run.threads_per_worker) == (700, 11, 4, 2, 1)
    assert_same(run.read(), reference)
    # another split of the batches into tasks, one worker, a model file, results gathered in memory: the same
    weights = tmp_path / "weights.pt"
    import torch

    torch.save(torch_model().state_dict(), weights)
    again = md.predict(str(weights), x, 12, factory=torch_model, seed=11, batch_size=64, strategy="vectorized",
                       num_workers=1, chunks_per_task=5)
    assert isinstance(again, mcu.Prediction)
    assert_same(again, reference)
    # mcu.predict's engine="ray" hook gives the same numbers
    hooked = mcu.predict("tests.distributed.test_ray:torch_model", x, 12, seed=11, batch_size=64,
                         strategy="vectorized", engine="ray", num_workers=2)
    assert_same(hooked, reference)


def test_predict_from_parquet_and_from_a_ray_dataset(md, ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = pool(300, seed=1).reshape(300, 2, 2)
    reference = mcu.predict(torch_model(), x, 10, seed=2, batch_size=32, strategy="loop")
    files = tmp_path / "pool"
    files.mkdir()
    for part, rows in enumerate((slice(0, 130), slice(130, 300))):  # two files, row groups of 50 rows
        flat = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].reshape(-1)), 4)
        ids = pa.array([f"item-{i}" for i in range(rows.start, rows.stop)])
        pq.write_table(pa.table({"key": ids, "pixels": flat}), files / f"part-{part}.parquet", row_group_size=50)
    run = md.predict(torch_model, files, 10, output=tmp_path / "out", column="pixels", shape=(2, 2),
                     id_column="key", seed=2, batch_size=32, strategy="loop", num_workers=2)
    result = run.read()
    assert_same(result, reference)
    assert result.id.tolist() == [f"item-{i}" for i in range(300)]
    table = pq.read_table(tmp_path / "out")  # plain Parquet: any reader gets the metrics
    assert {"index", "id", "mean_probabilities", "mutual_information", "label"} <= set(table.column_names)

    # 30 blocks, with ids
    dataset = ray_cluster.data.from_items([{"key": 10 * i, "x": x[i]} for i in range(300)], override_num_blocks=30)
    from_ray = md.predict(torch_model, dataset, 10, output=tmp_path / "ray", column="x", id_column="key", seed=2,
                          batch_size=32, strategy="loop", num_workers=1)
    result = from_ray.read()
    assert result.id.tolist() == list(range(0, 3000, 10))
    assert_same(result, reference)


def _slow_first_blocks(batch):
    import time

    time.sleep(0.2 * (3 - int(batch["id"][0]) // 25))  # block 0 finishes last, block 3 first
    return batch


def test_a_ray_dataset_keeps_its_order_when_blocks_finish_out_of_order(ray_cluster):
    from mcu.distributed.ray_engine import _make_pool
    from mcu.distributed.sources import PoolReader

    dataset = ray_cluster.data.range(100, override_num_blocks=4).map_batches(_slow_first_blocks, batch_size=None)
    x, ids = PoolReader(_make_pool(dataset, "id", None, None)).read(np.arange(100))
    np.testing.assert_array_equal(x, np.arange(100))


def test_a_killed_worker_is_retried_and_every_example_written_once(md, tmp_path):
    x = pool(400, seed=3)
    x[205, 0] = SENTINEL  # in batch 6 of 32-row batches: the worker that gets it dies once
    marker = tmp_path / "killed"
    reference = mcu.predict(torch_model(), x, 8, seed=4, batch_size=32, strategy="loop")
    run = md.predict(functools.partial(fragile_model, str(marker)), x, 8, output=tmp_path / "out", seed=4,
                     batch_size=32, strategy="loop", num_workers=2, chunks_per_task=2)
    assert marker.exists(), "the worker was not killed: the test did not exercise a retry"
    result = run.read()  # raises unless every index 0..N-1 appears exactly once
    assert_same(result, reference)


def test_query_top_k_agrees_with_mcu_active_query(md):
    x = pool(500, seed=5)
    subset = np.arange(3, 480, 2)
    for heuristic, k in (("bald", 9), ("batchbald", 4)):
        expected = mcu.active.query(torch_model(), x, k, heuristic=heuristic, n_samples=10, batch_size=40, seed=6,
                                    subset=subset, n_candidates=12, progress=False, strategy="loop")
        # the same call with engine="ray" (mcu.active.query's hook into mcu.distributed.query)
        got = mcu.active.query("tests.distributed.test_ray:torch_model", x, k, heuristic=heuristic, n_samples=10,
                               batch_size=40, seed=6, subset=subset, n_candidates=12, strategy="loop",
                               engine="ray", num_workers=2)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=heuristic)
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-9, err_msg=heuristic)
        assert got[0].dtype == np.int64 and got[1].dtype == np.float64


def test_structured_pools_and_outputs_equal_single_machine(md, tmp_path):
    pool_ = token_pool(230, seed=12)
    factory = "tests.distributed.test_ray:token_model"
    # a dict pool (by name), the first element of the tuple output: mcu.predict's hook and the Parquet files
    reference = mcu.predict(token_model(), pool_, 9, output=0, seed=13, batch_size=32, strategy="vectorized")
    hooked = mcu.predict(factory, pool_, 9, output=0, seed=13, batch_size=32, strategy="vectorized", engine="ray",
                         num_workers=2)
    assert_same(hooked, reference)
    run = md.predict(factory, pool_, 9, model_output=0, output=tmp_path / "out", seed=13, batch_size=32,
                     strategy="vectorized", num_workers=2, chunks_per_task=2)
    assert (run.n_items, run.n_tasks) == (230, 4)
    assert_same(run.read(), reference)
    # the same named inputs from the list columns of two Parquet files, with ids
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = tmp_path / "tokens"
    files.mkdir()
    for part, rows in enumerate((slice(0, 100), slice(100, 230))):
        pq.write_table(pa.table({"ids": list(pool_["input_ids"][rows]), "mask": list(pool_["attention_mask"][rows]),
                                 "key": np.arange(rows.start, rows.stop)}),
                       files / f"part-{part}.parquet", row_group_size=40)
    from_files = md.predict(factory, files, 9, model_output=0, column={"input_ids": "ids", "attention_mask": "mask"},
                            id_column="key", seed=13, batch_size=32, strategy="vectorized", num_workers=2)
    assert_same(from_files, reference)
    # a tuple pool (in order), a subset, a picklable callable output: mcu.active.query's hook
    ordered = (pool_["input_ids"], pool_["attention_mask"])
    subset = np.arange(1, 230, 3)
    expected = mcu.active.query(token_model(), ordered, 7, n_samples=8, batch_size=20, seed=14, subset=subset,
                                output=lambda out: out[0], strategy="loop", progress=False)
    got = mcu.active.query(factory, ordered, 7, n_samples=8, batch_size=20, seed=14, subset=subset,
                           output=lambda out: out[0], strategy="loop", engine="ray", num_workers=2)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-9)


def test_named_inputs_from_ray_dataset_columns_are_read_in_pool_order(ray_cluster):
    from mcu.distributed.ray_engine import _make_pool
    from mcu.distributed.sources import PoolReader

    tokens = token_pool(60, seed=15)
    dataset = ray_cluster.data.from_items([{"ids": tokens["input_ids"][i], "mask": tokens["attention_mask"][i],
                                            "key": i} for i in range(60)], override_num_blocks=6)
    made = _make_pool(dataset, {"input_ids": "ids", "attention_mask": "mask"}, None, "key")
    wanted = np.array([0, 7, 8, 33, 59])
    x, ids = PoolReader(made).read(wanted)
    assert list(x) == ["input_ids", "attention_mask"] and ids.tolist() == wanted.tolist()
    for name in x:
        assert x[name].dtype.kind == "i"
        np.testing.assert_array_equal(x[name], tokens[name][wanted])
    with pytest.raises(InputError, match="shape: only for one input column"):
        _make_pool(dataset, {"input_ids": "ids"}, (6,), None)
    with pytest.raises(InputError, match="column: 'nope' is not a column"):
        _make_pool(dataset, {"input_ids": "nope"}, None, None)


def test_structured_pool_and_output_errors_on_the_driver(md, tmp_path):
    pool_ = token_pool(10)
    lock = threading.Lock()
    with pytest.raises(InputError, match=r"^output: the callable .* cannot be pickled for the Ray workers"):
        mcu.active.query(token_model, pool_, 3, output=lambda out: (lock, out[0])[1], engine="ray")
    with pytest.raises(InputError, match=r"output= of mcu.predict.*cannot be pickled"):
        mcu.predict(token_model, pool_, 3, output=lambda out: (lock, out[0])[1], engine="ray")
    with pytest.raises(InputError, match=r"output: expected a key or attribute name.*got 1.5"):
        md.query(token_model, pool_, 3, output=1.5)
    ragged = dict(pool_, attention_mask=pool_["attention_mask"][:7])
    with pytest.raises(InputError, match=r"pool: every input must have the same batch axis.*'input_ids'\]: 10, "
                                         r"pool\['attention_mask'\]: 7"):
        md.query(token_model, ragged, 3)
    with pytest.raises(InputError, match=r"data\['input_ids'\]: expected a numpy array"):
        md.predict(token_model, {"input_ids": [[1, 2]]}, 3)
    with pytest.raises(InputError, match="data: got an empty dict"):
        md.predict(token_model, {}, 3)
    with pytest.raises(InputError, match="column, id_column, shape: only for"):
        md.predict(token_model, pool_, 3, shape=(6,))


def test_keras_file_equals_single_machine(md, tmp_path):
    require_backend("tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Dense(16, activation="relu"), L.Dropout(0.5), L.Dense(3)])
    path = tmp_path / "model.keras"
    model.save(path)
    x = pool(200, seed=7)
    reference = mcu.predict(keras.saving.load_model(path), x, 8, seed=8, batch_size=50, strategy="loop")
    run = md.predict(str(path), x, 8, output=tmp_path / "out", seed=8, batch_size=50, strategy="loop", num_workers=1,
                     cpus_per_worker=2)
    assert run.threads_per_worker == 2
    assert_same(run.read(), reference, tol=1e-5)
    # named inputs and a list of outputs (classes, then one regression value), sampled at index 0
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    h = L.Dropout(0.5)(L.Dense(8, activation="relu")(L.Concatenate()([a, b])))
    keras.Model({"a": a, "b": b}, [L.Dense(3)(h), L.Dense(1)(h)]).save(tmp_path / "two.keras")
    named = {"a": x, "b": pool(200, seed=10)[:, :2]}
    reference = mcu.predict(keras.saving.load_model(tmp_path / "two.keras"), named, 8, output=0, seed=8,
                            batch_size=50, strategy="loop")
    hooked = mcu.predict(str(tmp_path / "two.keras"), named, 8, output=0, seed=8, batch_size=50, strategy="loop",
                         engine="ray", num_workers=1, cpus_per_worker=2)
    assert_same(hooked, reference, tol=1e-5)


def test_regression_and_overwriting_a_previous_result(md, tmp_path):
    x = pool(150, seed=9)
    reference = mcu.predict(torch_model(), x, 6, task="regression", seed=1, batch_size=40, strategy="loop")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous-run.parquet").write_bytes(b"stale")
    run = md.predict(torch_model, x, 6, output=out, overwrite=True, task="regression", seed=1, batch_size=40,
                     strategy="loop", num_workers=1)
    result = run.read()  # the stale file is gone: read() checks that every index appears exactly once
    assert result.task == "regression" and result.mean.shape == (150, 3)
    assert_same(result, reference, fields=tuple(reference.to_dict()))


def test_an_error_on_a_worker_is_raised_as_the_mcu_error(md, tmp_path):
    # (last runs of the module: the actor of a failed run may hold its CPU a while after the error)
    with pytest.raises(NoDropoutError, match="no dropout module.*raised on a Ray worker"):
        md.predict(no_dropout_model, pool(20), 4, output=tmp_path / "out", preflight=False, num_workers=1)
    # a structured output without output=: the worker's error lists what there is
    with pytest.raises(InputError, match=r"output=.*available: \[0, 1\].*raised on a Ray worker"):
        md.query("tests.distributed.test_ray:token_model", token_pool(10), 3, n_samples=2, num_workers=1)


def test_errors_are_raised_on_the_driver_before_any_work(md, ray_cluster, tmp_path):
    import torch

    x = pool(10)
    pickled = tmp_path / "full.pt"
    torch.save(torch_model(), pickled)
    with pytest.raises(InputError, match="pickled"):
        md.predict(str(pickled), x, 4, output=tmp_path / "a")
    with pytest.raises(NoDropoutError):
        md.predict(no_dropout_model, x, 4, output=tmp_path / "b")
    with pytest.raises(InputError, match="data: expected a numpy array, a dict"):
        md.predict(torch_model, 42, 4, output=tmp_path / "c")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="output: directory .* is not empty; pass overwrite=True"):
        md.predict(torch_model, x, 4, output=tmp_path / "full")
    with pytest.raises(InputError, match="column: 'nope' is not a column"):
        md.predict(torch_model, ray_cluster.data.from_numpy(x), 4, output=tmp_path / "d", column="nope")
    with pytest.raises(InputError, match="k: expected at most the 10 examples"):
        md.query(torch_model, x, 11)
    with pytest.raises(InputError, match="frobnicate: unknown option"):
        md.predict(torch_model, x, 4, output=tmp_path / "e", frobnicate=1)
