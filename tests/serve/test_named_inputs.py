"""Named inputs over HTTP: ``{"inputs": {"input_ids": [[...]], "attention_mask": [[...]]}}`` with ``output=``.

Served answers equal ``mcu.predict`` on the same inputs and seed (a tiny Hugging Face BERT); token ids stay
integers; requests with the same names and per-example shapes share sampling calls, the others are batched
apart, and every row keeps its answer; bad named inputs get a 400 naming the field. Through Starlette's test
client (no server process).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("httpx") is None:
    pytest.skip('the serve extra is not installed (pip install "mcu[serve]")', allow_module_level=True)

from starlette.testclient import TestClient  # noqa: E402

import mcu  # noqa: E402
from mcu.serve import Service, create_app  # noqa: E402
from mcu.serve.cli import build_app  # noqa: E402
from tests.conftest import require_backend, require_module  # noqa: E402
from tests.serve import models  # noqa: E402

T = 12
INT64 = {"input_ids": "int64", "attention_mask": "int64"}


def tokens(n: int, length: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(length) < rng.integers(2, length + 1, size=(n, 1))).astype(np.int64)
    return {"input_ids": rng.integers(1, 50, size=(n, length)) * mask, "attention_mask": mask}


def as_json(x: dict[str, np.ndarray]) -> dict:
    return {"inputs": {k: v.tolist() for k, v in x.items()}}


def assert_rows_equal(rows: list[dict], reference: mcu.Prediction, tol: float = 1e-6) -> None:
    assert len(rows) == len(reference)
    assert [r["label"] for r in rows] == reference.label.tolist()
    for name, field in (("probabilities", "mean"), ("predictive_entropy", "predictive_entropy"),
                        ("mutual_information", "mutual_information")):
        np.testing.assert_allclose([r[name] for r in rows], getattr(reference, field), rtol=tol, atol=tol,
                                   err_msg=name)


@pytest.fixture(scope="module")
def bert():
    require_backend("torch")
    require_module("transformers")
    return models.tiny_bert()


@pytest.mark.parametrize("dtypes", [None, INT64], ids=["dtypes-from-json", "dtypes-stated"])
def test_named_inputs_equal_mcu_predict(bert, dtypes):
    x, other = tokens(3, seed=1), tokens(2, length=6, seed=2)
    reference = mcu.predict(bert, x, T, seed=5, batch_size=1, output="logits")
    app = create_app(bert, n_samples=T, seed=5, output="logits", input_dtype=dtypes)
    seen = []
    service = app.state.service
    predict = service._predict
    service._predict = lambda xs, *args: seen.append({k: v.dtype for k, v in xs.items()}) or predict(xs, *args)
    with TestClient(app) as client:
        response = client.post("/v1/predict", json=as_json(x))
        assert response.status_code == 200, response.text
        assert_rows_equal(response.json()["predictions"], reference)
        assert client.post("/v1/predict", json=as_json(other)).status_code == 200  # another length: fine too
        one = client.post("/v1/predict", json={"inputs": {k: v[0].tolist() for k, v in x.items()}})  # flat lists
        assert_rows_equal(one.json()["predictions"], mcu.predict(bert, {k: v[:1] for k, v in x.items()}, T, seed=5,
                                                                 batch_size=1, output="logits"))
        info = client.get("/v1/model").json()
    assert seen and all(d == {"input_ids": np.int64, "attention_mask": np.int64} for d in seen)  # ids stay ints
    assert info["output"] == "logits"
    assert info["input_names"] == (None if dtypes is None else ["input_ids", "attention_mask"])


def test_mcu_serve_output_and_dtypes_from_the_command_line(bert):
    app = build_app(["tests.serve.models:tiny_bert", "--output", "logits", "--n-samples", str(T), "--seed", "4",
                     "--input-dtype", "input_ids=int64,attention_mask=int64", "--input-shape",
                     "input_ids=8,attention_mask=8"])
    x = tokens(4, seed=3)
    with TestClient(app) as client:  # the known shapes and dtypes: warmed up at startup
        assert app.state.service.strategies
        response = client.post("/v1/predict", json=as_json(x))
        assert response.status_code == 200, response.text
        assert_rows_equal(response.json()["predictions"],
                          mcu.predict(bert, x, T, seed=4, batch_size=1, output="logits"))
        wrong = client.post("/v1/predict", json=as_json(tokens(1, length=6)))
        assert wrong.status_code == 400 and "inputs['input_ids']: expected one example of shape [8]" in \
            wrong.json()["error"]


def test_micro_batching_stacks_only_requests_of_one_signature_and_keeps_rows():
    """Unseeded: requests with the same names, per-example shapes and dtypes go into one sampling call (in
    order, padded to a bucket), the others into their own; every row gets its own answer back."""
    require_backend("torch")
    service = Service(models.token_labeller(), n_samples=6, output="logits", max_batch=16)
    calls = []
    predict = service._predict
    service._predict = lambda xs, *args: calls.append(xs) or predict(xs, *args)
    a, b, c = tokens(2, seed=4), tokens(3, seed=5), tokens(1, length=6, seed=6)
    d = {"attention_mask": tokens(1, seed=7)["attention_mask"], "input_ids": tokens(1, seed=7)["input_ids"]}
    floats = {k: v.astype(np.float32) for k, v in tokens(1, seed=8).items()}  # other dtypes: not stacked
    results = service.score([a, b, c, d, floats])
    signatures = [{k: (v.shape, v.dtype.name) for k, v in xs.items()} for xs in calls]
    assert signatures[:2] == [
        {"input_ids": ((8, 8), "int64"), "attention_mask": ((8, 8), "int64")},  # a, b, d: 6 rows padded to 8
        {"input_ids": ((1, 6), "int64"), "attention_mask": ((1, 6), "int64")},  # c alone
    ]
    np.testing.assert_array_equal(calls[0]["input_ids"][:6],
                                  np.concatenate([a["input_ids"], b["input_ids"], d["input_ids"]]))
    for request, result in zip((a, b, c, d), results):
        assert [row["label"] for row in result] == (request["input_ids"][:, 0] % 3).tolist()
    # float token ids: the model refuses them; that request alone gets a 400, the others were answered
    assert isinstance(results[4], Exception) and "the model cannot process named inputs" in str(results[4])


def test_the_micro_batcher_counts_examples_of_named_inputs():
    import asyncio

    from mcu.serve.batching import MicroBatcher

    groups = []

    def run(xs):
        groups.append([len(x["ids"]) for x in xs])
        return [len(x["ids"]) for x in xs]

    async def main():
        batcher = MicroBatcher(run, max_batch=4, max_wait=0.05)
        batcher.start()
        sizes = (3, 1, 2)  # 3 + 1 fill a batch of 4 examples; 2 goes to the next
        results = await asyncio.gather(*(batcher.submit({"ids": np.zeros((n, 5)), "mask": np.zeros((n, 5))})
                                         for n in sizes))
        await batcher.stop()
        return results

    assert asyncio.run(main()) == [3, 1, 2] and groups == [[3, 1], [2]]


BAD = {
    "missing input": ({"input_ids": [[1, 2]]}, "inputs: missing ['attention_mask']"),
    "unexpected input": ({"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "token_type_ids": [[0, 0]]},
                         "unexpected ['token_type_ids']"),
    "ragged": ({"input_ids": [[1, 2], [1]], "attention_mask": [[1, 1], [1]]}, "inputs['input_ids']: expected a "
                                                                               "rectangular nested list"),
    "mixed batch sizes": ({"input_ids": [[1, 2]], "attention_mask": [[1, 1], [1, 1]]},
                          "same number of examples; got input_ids: 1, attention_mask: 2"),
    "decimals for ids": ({"input_ids": [[1.5, 2]], "attention_mask": [[1, 1]]},
                         "inputs['input_ids']: expected integers (the model takes int64)"),
    "not a list": ({"input_ids": 3, "attention_mask": [[1, 1]]}, "inputs['input_ids']: expected a list"),
    "empty": ({"input_ids": [], "attention_mask": []}, "inputs['input_ids']: expected at least one example"),
    "string": ({"input_ids": [["a", "b"]], "attention_mask": [[1, 1]]}, "inputs['input_ids']: expected numbers"),
    "boolean": ({"input_ids": [[1, 2]], "attention_mask": [[True, 1]]}, "inputs['attention_mask']: expected "
                                                                        "numbers, got a boolean"),
    "a list for named inputs": ([[1, 2]], "inputs: expected named inputs"),
    "no named input": ({}, "inputs: expected at least one named input"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_named_inputs_get_a_400_naming_the_field(case):
    require_backend("torch")
    inputs, message = BAD[case]
    app = create_app(models.token_labeller(), n_samples=3, output="logits", input_dtype=INT64, warm_up=False)
    with TestClient(app) as client:
        response = client.post("/v1/predict", json={"inputs": inputs})
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
        good = client.post("/v1/predict", json={"inputs": {"input_ids": [[3, 4]], "attention_mask": [[1, 1]]}})
        assert good.status_code == 200 and good.json()["predictions"][0]["label"] == 0


def test_inconsistent_declarations_and_outputs_are_refused():
    require_backend("torch")
    model = models.token_labeller()
    with pytest.raises(mcu.InputError, match="input_shape, input_dtype: name different inputs"):
        Service(model, input_dtype={"input_ids": "int64"}, input_shape={"ids": [8]})
    with pytest.raises(mcu.InputError, match=r"input_dtype\['input_ids'\]: expected one of"):
        Service(model, input_dtype={"input_ids": "int8"})
    with pytest.raises(mcu.InputError, match="output: expected"):
        Service(model, output=1.5)
    with TestClient(create_app(model, n_samples=2, warm_up=False)) as client:  # no output=: the keys are listed
        response = client.post("/v1/predict", json={"inputs": {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}})
        assert response.status_code == 400 and "available: ['logits']" in response.json()["error"]
