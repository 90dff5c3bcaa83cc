"""The PyTorch fast paths' random streams and exact Bernoulli masks (mcu.backends.torch.masks)."""

from __future__ import annotations

import gc
import itertools
import weakref

import numpy as np
import pytest

from tests.conftest import require_module

torch = require_module("torch")

from mcu.backends.torch import masks as torch_masks  # noqa: E402
from mcu.backends.torch.masks import Streams, bernoulli_masks, splitmix64  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("keep", [0.5, 0.75, 0.25, 0.3125, 0.50390625, 0.7, 0.8, 1 / 3, 0.5 + 2**-9, 0.9990234375,
                                  0.01])
def test_bernoulli_mask_has_the_requested_keep_rate(keep):
    n = 4_000_000
    mask = bernoulli_masks((n,), keep, Streams([0]), CPU)[0]
    assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1}
    rate = mask.double().mean().item()
    se = (keep * (1 - keep) / n) ** 0.5
    assert abs(rate - keep) < 5 * se  # fixed seed; 5 standard errors


def test_bernoulli_mask_tie_path_is_exact():
    """keep = 0.5 + 2**-40: the first byte ties with probability 1/256 and must resolve with more bits."""
    keep = 0.5 + 2**-40
    mask = bernoulli_masks((2_000_000,), keep, Streams([1]), CPU)[0].double()
    assert abs(mask.mean().item() - keep) < 5 * (0.25 / 2_000_000) ** 0.5


def test_bernoulli_masks_are_independent_between_neighbours():
    mask = bernoulli_masks((1_000_000,), 0.5, Streams([2]), CPU)[0].double()
    corr = np.corrcoef(mask[:-1].numpy(), mask[1:].numpy())[0, 1]
    assert abs(corr) < 5 / 1000  # 5 standard errors of a correlation from 1e6 pairs


@pytest.mark.parametrize("keep", [0.5, 0.75, 0.3125, 0.50390625, 0.8])  # 1, 2, 4, 8 random bits; tie path
@pytest.mark.parametrize("shape", [(3, 5), (64, 512), (7, 1, 1)])
def test_each_mask_depends_only_on_its_own_stream(keep, shape):
    """Masks drawn together equal masks drawn one stream at a time (so grouping never changes samples)."""
    together = bernoulli_masks(shape, keep, Streams(range(6)), CPU)
    assert together.shape == (6, *shape) and together.dtype == torch.uint8
    for j in range(6):
        alone = bernoulli_masks(shape, keep, Streams([j]), CPU)[0]
        assert torch.equal(together[j], alone)


@pytest.mark.parametrize("keep", [0.5, 0.75, 0.8])
def test_masks_of_neighbouring_samples_are_independent(keep):
    masks = bernoulli_masks((20_000,), keep, Streams(range(50)), CPU).double()
    corr = np.corrcoef(masks.numpy())  # 50 x 50 correlations between samples' masks
    off = corr[~np.eye(50, dtype=bool)]
    assert np.abs(off).max() < 5 / 20_000**0.5  # 5 standard errors (1225 pairs: |z| > 5 has p ~ 1e-3 overall)
    rates = masks.mean(1).numpy()
    assert np.abs(rates - keep).max() < 5 * (keep * (1 - keep) / 20_000) ** 0.5


def test_the_tie_fallback_draws_from_the_masks_own_generator_and_stays_exact(monkeypatch):
    """With no reserved words every tie (1 in 256 elements) is resolved by extra draws from the mask's own
    generator: the rate stays exact and masks still depend only on their own stream."""
    keep = 0.8
    monkeypatch.setattr(torch_masks, "_reserve", lambda n: 0)
    masks = bernoulli_masks((100_000,), keep, Streams(range(5)), CPU)
    for j in (0, 4):
        assert torch.equal(masks[j], bernoulli_masks((100_000,), keep, Streams([j]), CPU)[0])
    rate = masks.double().mean().item()
    assert abs(rate - keep) < 5 * (keep * (1 - keep) / 500_000) ** 0.5
    monkeypatch.undo()
    # the reserve changes which words resolve a tie, not the distribution
    rate = bernoulli_masks((100_000,), keep, Streams(range(5)), CPU).double().mean().item()
    assert abs(rate - keep) < 5 * (keep * (1 - keep) / 500_000) ** 0.5


def test_bernoulli_masks_at_the_edges():
    for keep, value in ((1.0, 1), (0.0, 0)):
        assert torch.equal(bernoulli_masks((3,), keep, Streams([0]), CPU),
                           torch.full((1, 3), value, dtype=torch.uint8))




def _reference_words(seed: int, start: int, count: int) -> list[int]:
    """SplitMix64 in plain Python: word i of the stream keyed by splitmix64(seed + GAMMA)."""
    key = splitmix64(seed + 0x9E3779B97F4A7C15)
    return [splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15) for i in range(start, start + count)]


def test_stream_words_match_a_plain_python_splitmix64():
    """The tensor version (wrapping int64 products, masked arithmetic shifts) equals the reference bit for bit,
    across calls (the counter continues) and for seeds with the top bit set."""
    seeds = [0, 1, 7, 2**31 + 5, 2**32 - 1, 2**63 + 3]
    streams = Streams(seeds)
    first, second = streams.words(5), streams.words(3)
    for j, seed in enumerate(seeds):
        got = [w & (2**64 - 1) for w in torch.cat([first[j], second[j]]).tolist()]
        assert got == _reference_words(seed, 0, 8)
    assert streams.offset == 8


def test_stream_bits_and_bytes_are_uniform():
    words = Streams(range(64)).words(4096)  # 262,144 words
    bits = ((words.unsqueeze(-1) >> torch.arange(64)) & 1).double().mean((0, 1))
    assert (bits - 0.5).abs().max().item() < 5 * (0.25 / words.numel()) ** 0.5  # every bit position
    counts = np.bincount(words.view(torch.uint8).flatten().numpy(), minlength=256)
    chi2 = (((counts - counts.mean()) ** 2) / counts.mean()).sum()
    assert chi2 < 255 + 5 * (2 * 255) ** 0.5  # 255 degrees of freedom; about 5 standard deviations


def test_tie_words_depend_only_on_the_stream_and_the_mask():
    a, b = Streams([3, 4]), Streams([4])
    first = list(itertools.islice(a.tie_words(1, 5), 4))
    assert first == list(itertools.islice(b.tie_words(0, 5), 4))  # stream 1 of a is stream 0 of b
    assert first != list(itertools.islice(b.tie_words(0, 6), 4))  # another mask: other words
    assert all(0 <= w < 2**32 for w in first)


@pytest.mark.parametrize("keep", [0.5, 0.8])  # 0.8: the tie path, with its tie streams
def test_views_share_masks_drawn_once_and_equal_masks_drawn_per_block(monkeypatch, keep):
    """A call's blocks are views of one Streams; small masks are drawn once for all samples and sliced, larger
    ones per block. Either way each block gets exactly the masks of its own streams drawn alone, in order."""
    monkeypatch.setattr(torch_masks, "SHARED_MASK_BYTES", 10 * 300)  # (10, 300) shared, (10, 5000) not
    monkeypatch.setattr(torch_masks, "_reserve", lambda n: 0)  # every tie goes to the tie streams
    root = Streams(range(10))
    views = [root[0:4], root[4:7], root[7:10]]
    shapes = [(300,), (5000,), (3, 100)]
    got = [[view.masks(key, shape, keep, CPU) for key, shape in enumerate(shapes)] for view in views]
    assert sorted(name[0] for name in root._shared) == [0, 2]  # drawn once each; dropout 1 per block
    for view, masks in zip(views, got):
        alone = Streams(view.seeds)
        for shape, mask in zip(shapes, masks):
            assert torch.equal(mask, bernoulli_masks(shape, keep, alone, CPU))
        assert view.offset == alone.offset


def test_streams_and_their_views_are_freed_without_the_cycle_collector():
    """No reference cycle: a call's streams (and the masks shared between its blocks) go as soon as the call
    drops them, also while the cycle collector is off (e.g. paused around a timed call, as timeit does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        root = Streams(range(10))
        views = [root[0:5], root[5:10]]
        for view in views:
            view.masks("dropout", (30,), 0.5, CPU)
        assert root._shared and views[0].root is root and root.root is root
        freed = weakref.ref(root)
        del root, views, view
        assert freed() is None
    finally:
        if enabled:
            gc.enable()


def test_each_mask_resolves_its_ties_from_its_own_tie_stream(monkeypatch):
    """Two masks of one stream must not reuse tie words: each asks for the tie stream of its own start."""
    monkeypatch.setattr(torch_masks, "_reserve", lambda n: 0)
    asked = []
    tie_words = Streams.tie_words
    monkeypatch.setattr(Streams, "tie_words",
                        lambda self, j, offset: asked.append(offset) or tie_words(self, j, offset))
    streams = Streams([9])
    bernoulli_masks((4096,), 0.8, streams, CPU)
    middle = streams.offset
    bernoulli_masks((4096,), 0.8, streams, CPU)
    assert sorted(set(asked)) == [0, middle] and middle > 0
