"""mcu.sample itself: memory-bounded sample counts, seeds made per group (grouping changes no sample), one seed
rule for both backends, inputs refused clearly, a model's own exception reported as the model's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mcu
from mcu.errors import InputError
from mcu.strategies import prefix as prefix_module
from mcu.strategies.base import SeedStream
from tests.conftest import require_tensorflow_graph

REPO = Path(__file__).resolve().parents[2]
MCU_ROOT = str(Path(mcu.__file__).resolve().parents[1])  # the mcu under test (subprocesses import the same)


# ---- n_samples is bounded by memory, seeds are made per block ---------------------------------------


def _record_takes(monkeypatch) -> list[int]:
    taken: list[int] = []
    original = SeedStream.take

    def take(self, n):
        taken.append(n)
        return original(self, n)

    monkeypatch.setattr(SeedStream, "take", take)
    return taken


@pytest.mark.parametrize("strategy", ["prefix", "parallel"])
def test_seeds_are_made_per_group_and_grouping_changes_no_sample(backend, models, rng, monkeypatch, strategy):
    if backend == "tensorflow":
        require_tensorflow_graph("the prefix split")
    model, x = models.cnn(), models.image(rng, 3)
    whole = mcu.sample(model, x, 40, strategy=strategy, chunk_size=3 * 4, seed=5, workers=2)
    taken = _record_takes(monkeypatch)
    monkeypatch.setattr(prefix_module, "SEED_GROUP", 8, raising=False)
    grouped = mcu.sample(model, x, 40, strategy=strategy, chunk_size=3 * 4, seed=5, workers=2)
    assert taken and max(taken) <= 8, taken  # seeds for at most one group at a time, never all 40 at once
    np.testing.assert_array_equal(grouped, whole)


_HUGE = """
import resource, sys, numpy as np, mcu
from tests import _models
z = _models.zoo(sys.argv[1])
model, x = z.mlp(), z.vector(np.random.default_rng(0), 4)
mcu.sample(model, x, 3, seed=0)  # warm up: framework allocations happen before the limit
with open("/proc/self/status") as fh:
    vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))  # 3 GiB more at most
for strategy in ("auto", "loop", "vectorized", "prefix", "parallel"):
    try:
        mcu.sample(model, x, 10**9, strategy=strategy, seed=0)
        print(strategy, "returned")
    except BaseException as exc:
        print(strategy, type(exc).__name__, str(exc).split(":")[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_a_billion_samples_is_refused_before_allocating(backend):
    """``mcu.sample(model, x, 10**9)`` used to build 10**9 seeds first (PyTorch: a 7.45 GiB allocation, Keras:
    24 GB until the kernel killed it). Now every strategy raises InputError naming n_samples after one block;
    run under an address-space limit of 3 GiB more than the warmed-up process, so a regression fails here
    (MemoryError) instead of exhausting the machine."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([MCU_ROOT, str(REPO)]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", _HUGE, backend], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO, check=False)
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in
             ("auto", "loop", "vectorized", "prefix", "parallel")]
    assert lines == [f"{s} InputError n_samples" for s in ("auto", "loop", "vectorized", "prefix", "parallel")], (
        out.stdout + out.stderr[-2000:])


def test_n_samples_above_the_seed_space_is_refused(backend, models, rng):
    with pytest.raises(InputError, match=r"n_samples: expected an integer in \[1, 4294967296\]"):
        mcu.sample(models.mlp(), models.vector(rng, 2), 2**32 + 1)



def test_float64_input_beyond_the_model_dtype_is_refused(backend, models):
    x = np.full((2, 784), 1e300)  # finite in float64, inf in float32
    with pytest.raises(InputError, match="x: contains .*(beyond|after conversion)"):
        mcu.sample(models.mlp(), x, 2, seed=0)
    with pytest.raises(InputError, match="^x: "):
        mcu.predict(models.mlp(), x, 2, seed=0)


# ---- errors that say what is wrong ------------------------------------------------------------------


def test_an_exception_inside_a_torch_model_is_the_models_not_the_inputs():
    from tests.conftest import require_backend

    require_backend("torch")
    import torch

    class Buggy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)

        def forward(self, x):
            h = self.drop(self.fc(x))
            if h.shape[0] > 0:
                raise ValueError("bug in the model")
            return h

    x = np.ones((2, 4), np.float32)
    for strategy in ("auto", "loop"):
        with pytest.raises(InputError, match="^model: the model raised ValueError: bug in the model") as info:
            mcu.sample(Buggy(), x, 3, strategy=strategy)
        assert isinstance(info.value.__cause__, ValueError) and str(info.value.__cause__) == "bug in the model"


def test_seed_range_is_one_rule_for_both_backends(backend, models, rng):
    model, x = models.mlp(), models.vector(rng, 2)
    assert mcu.sample(model, x, 2, seed=2**64 - 1).shape[:2] == (2, 2)
    for seed in (2**64, -1):
        with pytest.raises(InputError, match=r"seed: expected an integer in \[0, 18446744073709551615\]"):
            mcu.sample(model, x, 2, seed=seed)


def test_object_dtype_input_is_refused(backend, models):
    x = np.empty((2, 784), dtype=object)
    x[:] = 0.5
    with pytest.raises(InputError, match="x: expected an array of numbers .* got dtype object"):
        mcu.sample(models.mlp(), x, 2)


def test_unknown_predict_keyword_is_refused(backend, models, rng):
    with pytest.raises(InputError, match="unknown_kw: unknown keyword argument of mcu.predict"):
        mcu.predict(models.mlp(), models.vector(rng, 2), 2, unknown_kw=1)
