"""PyTorch prefix caching: the fx split, fast masks in the suffix, fused channel dropout + convolution tables."""

from __future__ import annotations

import numpy as np
import pytest

import mcu

from tests.conftest import require_module

torch = require_module("torch")
from torch import nn  # noqa: E402

from mcu.backends import get_backend  # noqa: E402
from mcu.backends.torch import kernels  # noqa: E402
from mcu.backends.torch import split as torch_split  # noqa: E402
from mcu.backends.torch.backend import _twin_info  # noqa: E402
from mcu.backends.torch.kernels import Masks, fast_dropout  # noqa: E402
from mcu.backends.torch.masks import Streams  # noqa: E402
from tests import _models  # noqa: E402


@pytest.mark.parametrize("module", [nn.Dropout(0.5), nn.Dropout(0.2), nn.Dropout2d(0.25)])
def test_broadcast_dropout_equals_dropout_on_stacked_copies(module):
    x = torch.randn(5, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    stacked = x.repeat(4, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    expected = fast_dropout(stacked, module, Masks(Streams(range(4)), 0), 4)
    out = fast_dropout(x, module, Masks(Streams(range(4)), 0), 4, broadcast=True)
    assert out.shape == expected.shape and torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout convolutions run fastest on
    assert torch.equal(fast_dropout(x, module, None, 3, broadcast=True), stacked[:15])


def _split(model, x):
    backend = get_backend("torch")
    t = torch.from_numpy(x)
    with backend.mc_mode(model, "dropout", t) as twin:
        return backend.split(twin, t)


def test_prefix_activations_are_bit_identical_to_a_full_pass():
    model = _models.zoo("torch").cnn()
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    split, why = _split(model, x)
    assert split is not None, why
    (frontier,) = split.prefix(torch.from_numpy(x))
    with torch.no_grad():
        expected = model.eval()[:4](torch.from_numpy(x))  # conv-bn-relu-pool: everything before Dropout2d
    assert torch.equal(frontier, expected)


class BatchSizeCapture(nn.Module):
    """Uses x.size(0) after the dropout: a naive split would reuse the prefix's batch size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        n = x.size(0)
        h = self.drop(self.fc(x))
        return self.out(h.reshape(n, -1)[:, :16] if h.shape[1] >= 16 else torch.cat([h, h], 1).reshape(n, -1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.drop(self.fc(x))


@pytest.mark.parametrize("cls,dim", [(BatchSizeCapture, 8), (DataDependent, 4)])
def test_models_that_cannot_be_split_fall_back_and_say_why(cls, dim):
    model = cls()
    x = np.ones((3, dim), np.float32)
    samples, info = mcu.sample(model, x, 6, seed=0, return_info=True)
    assert samples.shape[:2] == (6, 3)
    assert info.strategy in ("loop", "vectorized") and "no split" in info.strategy_reason
    _, info = mcu.sample(model, x, 6, strategy="prefix", return_info=True)
    assert info.strategy == "vectorized" and "cannot be split" in info.strategy_reason


def test_fp16_on_a_cpu_without_native_support_warns():
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this CPU has native fp16")
    with pytest.warns(RuntimeWarning, match="no native float16"):
        mcu.sample(_models.zoo("torch").mlp(), np.ones((2, 784), np.float32), 2, precision="fp16", strategy="loop")


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.d, self.scale = nn.Linear(4, 4), nn.Dropout(0.5), 1.0

    def forward(self, x):
        return self.d(self.l(x)) * self.scale


def test_a_changed_plain_attribute_invalidates_the_cached_split():
    """torch.fx bakes plain attributes in as constants; the cached split must notice they changed."""
    model, x = Scaled(), np.ones((3, 4), np.float32)
    before = mcu.sample(model, x, 50, strategy="prefix", seed=0)
    model.scale = 100.0
    after = mcu.sample(model, x, 50, strategy="prefix", seed=0)
    np.testing.assert_allclose(after, 100.0 * before, rtol=1e-5)


def test_a_model_that_stops_being_splittable_does_not_reuse_a_split_choice():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = np.ones((3, 4), np.float32)
    mcu.sample(model, x, 20, seed=0)
    model[2] = DataDependent()  # untraceable from now on (and 8 -> 4 features)
    model[2].fc = nn.Linear(8, 4)
    out, info = mcu.sample(model, x, 20, seed=0, return_info=True)
    assert out.shape == (20, 3, 4) and "no split" in info.strategy_reason


def test_channel_dropout_on_the_wrong_rank_falls_back_instead_of_failing():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(4 * 6, 2))
    x = np.ones((3, 2, 8), np.float32)
    with pytest.warns(UserWarning):  # torch's own warning about Dropout2d on 3-D input
        out, info = mcu.sample(model, x, 6, strategy="prefix", seed=0, return_info=True)
    assert out.shape == (6, 3, 2) and info.strategy == "vectorized"


class Counting(nn.Module):
    """A plain attribute that changes on every call without changing the output."""

    def __init__(self):
        super().__init__()
        self.l, self.d, self.calls = nn.Linear(4, 4), nn.Dropout(0.5), 0

    def forward(self, x):
        self.calls += 1
        return self.d(self.l(x))


def test_a_changed_attribute_that_does_not_matter_keeps_the_split(monkeypatch):
    model, x = Counting(), np.ones((3, 4), np.float32)
    first = mcu.sample(model, x, 20, strategy="prefix", seed=0)
    builds = []
    monkeypatch.setattr(torch_split, "_build", lambda *a: builds.append(1) or pytest.fail("rebuilt"))
    second, info = mcu.sample(model, x, 20, strategy="prefix", seed=0, return_info=True)
    assert info.strategy == "prefix" and not builds
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("affine,bias", [(True, True), (False, False), (True, False)])
def test_conv_bn_folding_matches_the_two_modules(affine, bias):
    from mcu.backends.torch.kernels import conv_bn

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(5, affine=affine)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    if affine:
        nn.init.uniform_(bn.weight, 0.5, 2)
        nn.init.uniform_(bn.bias, -1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)), rtol=1e-5, atol=1e-5)
        bn.train()  # batch statistics: not foldable, runs as it is
        torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)))


def _with_bn_stats(model, shape):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape))
    return model.eval()


def test_the_suffix_folds_batchnorm_into_the_convolution_before_it():
    # element-wise dropout before the convolution: not a channel dropout + convolution pair, so conv_bn
    model = _with_bn_stats(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.25), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 6 * 6, 3)), (1, 8, 8))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    split, why = _split(model, x)
    assert split is not None, why
    assert "conv_bn" in split.suffix_module.code and not split.fused
    model.eval()  # dropout inactive: the folded suffix must reproduce the model, on each stacked copy
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
        out = split.suffix(split.prefix(torch.from_numpy(x)), None, copies=2)
    torch.testing.assert_close(out, torch.cat([expected, expected]), rtol=1e-5, atol=1e-5)


def _pair_model(conv: nn.Conv2d, bn: bool = True, size: int = 12):
    """conv-ReLU (prefix), then Dropout2d + ``conv`` (+ BatchNorm): a channel dropout + convolution pair."""
    layers = [nn.Conv2d(2, conv.in_channels, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.25), conv]
    layers += [nn.BatchNorm2d(conv.out_channels)] if bn else []
    probe = nn.Sequential(*layers).eval()(torch.zeros(1, 2, size, size))
    layers += [nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(probe[0].numel(), 3)]
    return _with_bn_stats(nn.Sequential(*layers), (2, size, size))


def _builds(twin, backend):
    """The split of a sampling twin with and without fused channel dropout + convolution pairs."""
    info = _twin_info(twin)
    return tuple(torch_split._build(info, backend.dropout_types, fuse=fuse) for fuse in (True, False))


@pytest.mark.parametrize("conv, bn", [
    (nn.Conv2d(5, 7, 3, padding=1), True),
    (nn.Conv2d(5, 7, 3, padding=1, bias=False), False),
    (nn.Conv2d(5, 7, (3, 2), stride=2, padding=(1, 0), dilation=(2, 1)), True),
    (nn.Conv2d(5, 7, 5), False),
])
@pytest.mark.parametrize("n", [1, 4, 9])  # 9 examples: the suffix runs in row blocks (table bytes shrunk below)
def test_a_fused_channel_dropout_convolution_gives_the_unfused_samples(conv, bn, n, monkeypatch):
    """The pair computed from per-channel tables draws the same masks as dropout-then-convolution (same
    generators, same order), so the samples agree up to rounding, whatever the rows per block."""
    monkeypatch.setattr(kernels, "ROW_TABLE_BYTES", 4 * kernels.table_bytes(
        torch.zeros(1, 5, 12, 12), conv))
    model = _pair_model(conv, bn)
    backend = get_backend("torch")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((n, 2, 12, 12)).astype(np.float32))
    with backend.mc_mode(model, "dropout", x) as twin:
        fused, plain = _builds(twin, backend)
        assert fused.fused and not plain.fused and "channel_dropout_conv" in fused.suffix_module.code
        frontier = fused.prefix(x)
        assert (fused.row_block(frontier) is not None) == (n == 9)
        seeds = list(range(40, 46))
        a = fused.suffix(frontier, backend.generators(model, seeds), tables={})
        b = plain.suffix(frontier, backend.generators(model, seeds))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.std(0).min() > 0  # the masks do vary between samples
        # inactive dropout: the model's own output for every copy
        model.eval()  # the dropouts too (mc_mode restores every flag)
        out = fused.suffix(frontier, None, copies=2)
        expected = model(x)
        torch.testing.assert_close(out, torch.cat([expected, expected]), rtol=1e-5, atol=1e-5)


def test_fused_samples_do_not_depend_on_the_block_or_row_grouping(monkeypatch):
    model = _models.zoo("torch").cnn()
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    reference = mcu.sample(model, x, 12, strategy="prefix", seed=3, chunk_size=12 * 6)
    for chunk in (6, 5 * 6):
        torch.testing.assert_close(mcu.sample(model, x, 12, strategy="prefix", seed=3, chunk_size=chunk),
                                   reference, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernels, "ROW_TABLE_BYTES", 1)  # one example per row block
    torch.testing.assert_close(mcu.sample(model, x, 12, strategy="prefix", seed=3, chunk_size=4 * 6),
                               reference, rtol=1e-5, atol=1e-5)


def test_fused_pairs_are_not_used_where_they_do_not_apply():
    backend = get_backend("torch")
    cases = [
        nn.Conv2d(5, 7, 1),  # a 1x1 kernel: no fewer multiply-adds
        nn.Conv2d(6, 6, 3, groups=2),
        nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(5, 7, 3, padding="same"),
    ]
    for conv in cases:
        model = _pair_model(conv, bn=False)
        x = torch.zeros(2, 2, 12, 12)
        with backend.mc_mode(model, "dropout", x) as twin:
            split, why = backend.split(twin, x)
        assert split is not None and not split.fused, (conv, why)
    hooked = _pair_model(nn.Conv2d(5, 7, 3))
    hooked[3].register_forward_hook(lambda *a: None)
    with backend.mc_mode(hooked, "dropout", torch.zeros(2, 2, 12, 12)) as twin:
        split, why = backend.split(twin, torch.zeros(2, 2, 12, 12))
    assert split is not None and not split.fused


def test_a_fused_pair_with_a_changed_module_falls_back_at_call_time():
    """The pair re-checks the live convolution on every call (here its padding mode changes after tracing)
    and then runs as dropout, then convolution."""
    conv = nn.Conv2d(5, 7, 3, padding=1)
    model = _pair_model(conv, bn=True)
    backend = get_backend("torch")
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 2, 12, 12)).astype(np.float32))
    with backend.mc_mode(model, "dropout", x) as twin:
        fused, plain = _builds(twin, backend)
        frontier = fused.prefix(x)
        twin[3].padding_mode = "circular"  # the module the split calls (the twin's copy of conv)  # now not unfoldable: both must give circular-padding results
        a = fused.suffix(frontier, backend.generators(model, [1, 2, 3]))
        b = plain.suffix(frontier, backend.generators(model, [1, 2, 3]))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_fused_samples_are_close_to_fp32():
    model = _models.zoo("torch").cnn()
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    a = mcu.sample(model, x, 20, strategy="prefix", seed=5)
    b = mcu.sample(model, x, 20, strategy="prefix", seed=5, precision="bf16")
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # same masks; bf16 rounding only


def test_modules_with_forward_hooks_are_called_not_rewritten():
    """Folding, in-place ReLU and fast dropout replace module calls: never for a module the user hooked."""
    model = _models.zoo("torch").cnn()
    calls = {i: 0 for i in (5, 6, 7, 9)}  # conv, BatchNorm, ReLU, Dropout2d of the stochastic part
    for i in calls:
        model[i].register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    mcu.sample(model, x, 5, strategy="prefix", seed=0)  # builds (and validates) the split
    calls.update({i: 0 for i in calls})
    _, info = mcu.sample(model, x, 5, strategy="prefix", seed=0, return_info=True)
    assert info.strategy == "prefix" and all(n >= 1 for n in calls.values()), calls


def test_a_bf16_call_splits_the_model_too():
    """The split is validated in fp32 even inside autocast (bf16 rounding of a folded convolution must not
    make a bf16 call fall back to the slow strategies)."""
    model = _models.zoo("torch").cnn()
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    _, info = mcu.sample(model, x, 10, strategy="prefix", precision="bf16", seed=0, return_info=True)
    assert info.strategy == "prefix", info.strategy_reason


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.d, self.out = nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1)
        self.register_buffer("mean", torch.zeros(4))
        self._scale = 1.0

    def forward(self, x):  # the dropout acts on zeros: a split with a suffix, yet deterministic samples
        h = self.fc(x - self.mean)
        return self.out(h + self.d(torch.zeros_like(h))) * self._scale


@pytest.mark.filterwarnings("ignore::mcu.errors.DropoutSiteWarning")
@pytest.mark.parametrize("change", ["buffer", "private", "parameter"])
def test_a_replaced_buffer_parameter_or_private_attribute_is_seen(change):
    """The split cache must notice what a trace baked in changing: a replaced buffer or parameter object, a
    private attribute (the cheap check compares them, names starting with '_' included)."""
    model, x = Centered(), np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    mcu.sample(model, x, 2, strategy="prefix", seed=0)
    if change == "buffer":
        model.mean = torch.full((4,), 100.0)
    elif change == "private":
        model._scale = 10.0
    else:
        model.out.weight = nn.Parameter(model.out.weight.detach() * 10)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    got = mcu.sample(model, x, 2, strategy="prefix", seed=1)
    np.testing.assert_allclose(got, np.stack([expected, expected]), rtol=1e-5, atol=1e-5)


def test_in_place_relu_never_overwrites_what_a_hook_kept():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o))
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    mcu.sample(model, x, 20, strategy="prefix", seed=0)
    assert min(float((o < 0).float().mean()) for o in seen) > 0.1  # pre-ReLU values keep their negatives


def test_a_scripted_dropout_before_the_first_dropout_module_stays_random_per_sample():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Dropout(0.5))
    model = nn.Sequential(scripted, nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    x = np.ones((64, 8), np.float32)
    fast = mcu.sample(model, x, 200, strategy="prefix", seed=0)
    loop = mcu.sample(model, x, 200, strategy="loop", seed=1)
    ratio = fast.std(0).mean() / loop.std(0).mean()
    assert 0.85 < ratio < 1.15  # a once-drawn (prefix-cached) mask gave ~0.57


def test_the_tables_of_fused_pairs_count_once_in_the_memory_budget():
    """Tables are built once per call (per row block), not per copy: charged once against an explicit
    max_memory, and the copies then get what is left."""
    model = _models.zoo("torch").cnn()  # Dropout2d + 8->16 conv on 14x14: one example's table is 9*16*196*4 bytes
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    table = 9 * 16 * 14 * 14 * 4
    _, info = mcu.sample(model, x, 100, strategy="prefix", max_memory=table // 2, return_info=True)
    assert info.details["copies_per_pass"] == 1
    copies = [mcu.sample(model, x, 100, strategy="prefix", max_memory=table + k * 16 * 14 * 14 * 4,
                         return_info=True)[1].details["copies_per_pass"] for k in (8, 32)]
    # a copy holds at least the convolution's output (16 x 14 x 14 floats): at most k copies fit
    assert 1 < copies[0] <= 8 and copies[0] < copies[1] <= 32, copies


def test_reused_buffers_never_overwrite_a_result_still_in_use():
    """The fused convolution's output buffer is reused by later blocks only when nothing references it: here
    the model's output *is* (a view of) that buffer, and every block's samples must survive the next block."""
    # 16 channels: 2**32 masks per example, so distinct samples are expected (4 channels: 12 samples collide
    # with probability ~1/4)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.5), nn.Conv2d(16, 3, 3)).eval()
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    backend = get_backend("torch")
    with backend.mc_mode(model, "dropout", torch.from_numpy(x)) as twin:
        fused, plain = _builds(twin, backend)
        frontier = fused.prefix(torch.from_numpy(x))
        tables: dict = {}
        blocks = [fused.suffix(frontier, backend.generators(model, [s, s + 1]), tables=tables) for s in (0, 2, 4)]
        expected = [plain.suffix(frontier, backend.generators(model, [s, s + 1])) for s in (0, 2, 4)]
    for got, want in zip(blocks, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    samples = mcu.sample(model, x, 12, strategy="prefix", seed=1, chunk_size=2 * 2)
    assert len({s.tobytes() for s in samples}) == 12  # no block's samples were overwritten by a later one


@pytest.mark.parametrize("strategy", ["auto", "prefix", "parallel"])
def test_a_call_leaves_no_reference_cycles_behind(strategy):
    """What a call allocates is freed when it returns, also while Python's cycle collector is paused (as the
    benchmark does around a timed call): no object of a call may reference itself, or it would keep the
    call's keys and shared masks alive until the next collection."""
    import gc

    model = _models.zoo("torch").cnn()
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    mcu.sample(model, x[:1], 2, strategy=strategy)  # the split is traced and cached here
    enabled = gc.isenabled()
    for _ in range(5):  # what earlier tests left (freeing some makes more garbage: weak-keyed caches)
        if not gc.collect():
            break
    gc.disable()
    try:
        mcu.sample(model, x, 20, strategy=strategy)  # auto: a new batch size, so a new probe
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()


def _fused_and_plain(model, x):
    backend = get_backend("torch")
    with backend.mc_mode(model, "dropout", x) as twin:
        info = _twin_info(twin)
        split, why = torch_split.split_model(info, x, backend.dropout_types)
        assert split is not None, why
        plain = torch_split._build(info, backend.dropout_types, fuse=False)
        frontier = split.prefix(x)
        seeds = list(range(20, 26))
        fused = split.suffix(frontier, backend.generators(model, seeds))
        unfused = plain.suffix(frontier, backend.generators(model, seeds))
    return split, fused, unfused


class DropoutBetween(nn.Module):
    """Another dropout runs between the Dropout2d and its convolution: masks must be drawn in model order."""

    def __init__(self):
        super().__init__()
        self.c1, self.d2, self.d = nn.Conv2d(2, 5, 3, padding=1), nn.Dropout2d(0.25), nn.Dropout(0.5)
        self.conv, self.out = nn.Conv2d(5, 7, 3), nn.Linear(7 * 10 * 10 + 5 * 12 * 12, 3)

    def forward(self, x):
        f = torch.relu(self.c1(x))
        a = self.d2(f)
        b = self.d(f.flatten(1))
        return self.out(torch.cat([self.conv(a).flatten(1), b], 1))


class IntFromInput(nn.Module):
    """A plain int taken from the input's shape is a frontier value the row blocks must pass through."""

    def __init__(self):
        super().__init__()
        self.c1, self.d2, self.conv = nn.Conv2d(2, 5, 3, padding=1), nn.Dropout2d(0.25), nn.Conv2d(5, 7, 3)
        self.out = nn.Linear(7 * 10 * 10, 3)

    def forward(self, x):
        width = x.shape[-1]
        return self.out(self.conv(self.d2(torch.relu(self.c1(x)))).flatten(1)) * (width / 12)


class RowsReshaped(nn.Module):
    """A dropout after a reshape that folds positions into rows: row blocks would mis-slice its masks."""

    def __init__(self):
        super().__init__()
        self.c1, self.d2, self.conv = nn.Conv2d(2, 5, 3, padding=1), nn.Dropout2d(0.25), nn.Conv2d(5, 7, 3)
        self.d, self.out = nn.Dropout(0.5), nn.Linear(7 * 10 * 10, 3)

    def forward(self, x):
        y = self.conv(self.d2(torch.relu(self.c1(x))))
        y = self.d(y.permute(0, 2, 3, 1).reshape(-1, 7)).reshape(x.shape[0] * 0 + y.shape[0], -1)
        return self.out(y)


def test_fused_pairs_keep_the_model_order_of_mask_draws():
    torch.manual_seed(0)
    model = DropoutBetween().eval()
    x = torch.randn(3, 2, 12, 12)
    split, fused, unfused = _fused_and_plain(model, x)
    assert split.fused
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_row_blocks_pass_plain_frontier_values_through(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "ROW_TABLE_BYTES", 1)  # one example per row block
    model = IntFromInput().eval()
    x = torch.randn(5, 2, 12, 12)
    split, fused, unfused = _fused_and_plain(model, x)
    assert split.fused and split.row_block(split.prefix(x)) == 1
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_a_split_whose_row_blocks_would_change_the_samples_is_not_fused(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "ROW_TABLE_BYTES", 1)
    model = RowsReshaped().eval()
    x = torch.randn(4, 2, 12, 12)
    split, fused, unfused = _fused_and_plain(model, x)
    assert not split.fused  # validation ran the row blocks with real masks and refused the fusion
    torch.testing.assert_close(fused, unfused)


@pytest.mark.parametrize("rate", [0.0, 1.0, 0.3])
def test_fused_pairs_at_edge_and_non_dyadic_rates(rate):
    model = _pair_model(nn.Conv2d(5, 7, 3, padding=1))
    model[2].p = rate
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 2, 12, 12)).astype(np.float32))
    split, fused, unfused = _fused_and_plain(model, x)
    assert bool(split.fused) == (rate > 0)  # rate 0 is not dropout: an identity, no pair
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
