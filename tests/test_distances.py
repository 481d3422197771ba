"""Distances of Carlini et al. 2023 and the blocked nearest-neighbour search against naive references."""

import math

import pytest
import torch

from privdiff.distances import (
    calibrated_l2,
    l2,
    nearest_neighbors,
    nearest_two,
    pairwise_l2,
    pairwise_tiled_l2,
    resolve_tile_size,
    tiled_l2,
)

torch.set_num_threads(1)


def naive_l2_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 reference: sqrt(mean squared difference) for every pair, by broadcasting."""
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    return (a[:, None, :] - b[None, :, :]).pow(2).mean(dim=2).sqrt()


def test_l2_by_hand():
    # one 1x2x2 image pair: differences 0.5, 0, 0, 0.5 -> mean square 0.125 -> l2 = sqrt(0.125)
    a = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    b = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]])
    assert l2(a, b).item() == pytest.approx(math.sqrt(0.125), abs=1e-7)
    # two channels: channel 0 differs by 1 everywhere, channel 1 equal -> mean square 0.5
    c = torch.zeros(1, 2, 2, 2)
    d = c.clone()
    d[0, 0] = 1.0
    assert l2(c, d).item() == pytest.approx(math.sqrt(0.5), abs=1e-7)
    assert l2(c, c).item() == 0.0


def test_tiled_l2_by_hand():
    # 1x4x4 image, 2x2 tiles. b differs from a by 0.4 on all of the top-left tile and by 0.2 on one
    # pixel of the bottom-right tile.
    a = torch.zeros(1, 1, 4, 4)
    b = a.clone()
    b[0, 0, :2, :2] = 0.4
    b[0, 0, 3, 3] = 0.2
    # per tile: top-left sqrt(0.16) = 0.4, bottom-right sqrt(0.04 / 4) = 0.1, others 0 -> max 0.4
    assert tiled_l2(a, b, 2).item() == pytest.approx(0.4, abs=1e-6)
    # whole image: sqrt((4 * 0.16 + 0.04) / 16) = sqrt(0.0425)
    assert tiled_l2(a, b, None).item() == pytest.approx(math.sqrt(0.0425), abs=1e-6)
    assert tiled_l2(a, b, 4).item() == pytest.approx(math.sqrt(0.0425), abs=1e-6)
    assert l2(a, b).item() == pytest.approx(math.sqrt(0.0425), abs=1e-6)
    # 1x1 tiles: the largest single-pixel difference
    assert tiled_l2(a, b, 1).item() == pytest.approx(0.4, abs=1e-6)
    # tiles span all channels: a 2-channel image where only channel 1 of one tile differs by 0.6
    c = torch.zeros(1, 2, 4, 4)
    e = c.clone()
    e[0, 1, 2:, :2] = 0.6
    # that tile holds 8 values, 4 of them differ: sqrt(4 * 0.36 / 8) = sqrt(0.18)
    assert tiled_l2(c, e, 2).item() == pytest.approx(math.sqrt(0.18), abs=1e-6)


def test_pairwise_matches_aligned():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 3, 8, 8, generator=g)
    b = torch.rand(5, 3, 8, 8, generator=g)
    ref = naive_l2_matrix(a, b)
    torch.testing.assert_close(pairwise_l2(a, b).double(), ref, atol=1e-6, rtol=0)
    tiled = pairwise_tiled_l2(a, b, 4)
    assert tiled.shape == (7, 5)
    for i in range(7):
        torch.testing.assert_close(tiled[i], tiled_l2(a[i].expand(5, -1, -1, -1), b, 4), atol=1e-6, rtol=0)
    # the max over tiles is never below the whole-image l2
    assert bool((tiled >= pairwise_l2(a, b) - 1e-6).all())


def test_tile_size_must_divide():
    x = torch.rand(2, 1, 6, 6)
    with pytest.raises(ValueError, match="divisible"):
        tiled_l2(x, x, 4)
    with pytest.raises(ValueError, match="divisible"):
        pairwise_tiled_l2(x, x, 4)
    assert resolve_tile_size(16, 16) is None
    assert resolve_tile_size(32, 32) == 8
    assert resolve_tile_size(64, 64, 4) == 4


def test_input_validation():
    x = torch.rand(3, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        l2(x * 2 - 1, x)
    with pytest.raises(ValueError, match="floating"):
        nearest_neighbors((x * 255).to(torch.uint8), x)
    with pytest.raises(ValueError, match="same"):
        l2(x, x[:2])
    with pytest.raises(ValueError, match="k="):
        nearest_neighbors(x, x, k=4)
    with pytest.raises(ValueError):
        nearest_neighbors(x, torch.rand(3, 1, 4, 5))


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("block_size", [None, 1, 13, 50, 1000])
def test_nearest_neighbors_matches_naive(k, block_size):
    g = torch.Generator().manual_seed(k)
    q = torch.rand(61, 3, 4, 4, generator=g)  # 61 and 47 are not divisible by the block sizes
    r = torch.rand(47, 3, 4, 4, generator=g)
    ref = naive_l2_matrix(q, r)
    ref_d, ref_i = ref.topk(k, dim=1, largest=False)
    nb = nearest_neighbors(q, r, k=k, block_size=block_size)
    assert nb.distances.shape == (61, k) and nb.indices.shape == (61, k)
    assert nb.indices.dtype == torch.long
    torch.testing.assert_close(nb.distances.double(), ref_d, atol=1e-6, rtol=0)
    # indices agree up to ties: the distance of each returned index is the reported one
    torch.testing.assert_close(ref.gather(1, nb.indices), ref_d, atol=1e-6, rtol=0)
    assert bool((nb.distances[:, 1:] >= nb.distances[:, :-1]).all())


def test_nearest_neighbors_flat_and_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(20, 30, generator=g, dtype=torch.float64)
    r = torch.rand(40, 30, generator=g, dtype=torch.float64)
    nb = nearest_neighbors(q, r, k=2, block_size=7)
    assert nb.distances.dtype == torch.float64
    ref_d, ref_i = naive_l2_matrix(q, r).topk(2, dim=1, largest=False)
    torch.testing.assert_close(nb.distances, ref_d, atol=1e-12, rtol=0)
    assert torch.equal(nb.indices, ref_i)


def test_nearest_neighbors_tiny_memory_cap_is_exact():
    """A cap of a few bytes forces 1x1 blocks: the streaming search must still be exact."""
    g = torch.Generator().manual_seed(2)
    q = torch.rand(23, 12, generator=g)
    r = torch.rand(17, 12, generator=g)
    ref_d, ref_i = naive_l2_matrix(q, r).topk(3, dim=1, largest=False)
    for cap in (1, 64, 200):
        nb = nearest_neighbors(q, r, k=3, max_block_bytes=cap)
        torch.testing.assert_close(nb.distances.double(), ref_d, atol=1e-6, rtol=0)
        assert torch.equal(nb.indices, ref_i)


def test_nearest_neighbors_exact_copies_are_zero():
    g = torch.Generator().manual_seed(3)
    r = torch.rand(30, 3, 8, 8, generator=g)
    q = r[[4, 9, 4]]
    nb = nearest_neighbors(q, r, k=1)
    assert nb.indices[:, 0].tolist() == [4, 9, 4]
    assert nb.distances.abs().max().item() == 0.0
    d1, d2, i1 = nearest_two(q, r)
    assert i1.tolist() == [4, 9, 4] and bool((d2 > 0.1).all()) and d1.abs().max().item() == 0.0


def naive_calibrated(samples, references, n, alpha):
    d = naive_l2_matrix(samples, references)
    n = min(n, references.shape[0])
    near, idx = d.topk(n, dim=1, largest=False)
    score = [near[i, 0].item() / (alpha * near[i].mean().item()) for i in range(d.shape[0])]
    return torch.tensor(score, dtype=torch.float64), idx[:, 0], near[:, 0]


@pytest.mark.parametrize("n,alpha", [(50, 0.5), (5, 0.5), (10, 0.8)])
def test_calibrated_l2_matches_naive(n, alpha):
    g = torch.Generator().manual_seed(n)
    refs = torch.rand(80, 3, 4, 4, generator=g)
    samples = torch.cat([torch.rand(10, 3, 4, 4, generator=g), (refs[:5] + 0.01).clamp(0, 1)])
    cal = calibrated_l2(samples, refs, n=n, alpha=alpha, block_size=16)
    score, idx, near = naive_calibrated(samples, refs, n, alpha)
    torch.testing.assert_close(cal.score.double(), score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cal.nearest_l2.double(), near, atol=1e-6, rtol=0)
    assert torch.equal(cal.nearest_index, idx)
    assert cal.n == min(n, 80)
    # the near-copies score far below 1, random images around 2 (1 / alpha for a flat neighbourhood)
    assert bool((cal.score[10:] < 0.3).all()) and bool((cal.score[:10] > 1).all())


def test_calibrated_l2_uses_all_references_when_fewer_than_n():
    g = torch.Generator().manual_seed(5)
    refs = torch.rand(6, 1, 4, 4, generator=g)
    samples = torch.rand(4, 1, 4, 4, generator=g)
    cal = calibrated_l2(samples, refs, n=50)
    score, _, _ = naive_calibrated(samples, refs, 6, 0.5)
    assert cal.n == 6
    torch.testing.assert_close(cal.score.double(), score, atol=1e-5, rtol=1e-5)
    d = cal.to_dict()
    assert d["n"] == 6 and isinstance(d["score"][0], float) and isinstance(d["nearest_index"][0], int)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("block_size", [None, 1000])
def test_nearest_neighbors_k50_candidate_selection_matches_naive(ties, block_size, monkeypatch):
    """k=50 over 2000 references: a per-row bound prunes each distance block before the top-k (one
    block, or two with the running bound); with most references identical (ties at the bound) the
    search falls back to the top-k of whole blocks. Both give the naive answer."""
    g = torch.Generator().manual_seed(5)
    q = torch.rand(61, 3, 4, 4, generator=g)
    r = torch.rand(2000, 3, 4, 4, generator=g)
    if ties:
        r[20:] = r[0]
    widths = []
    topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, *a, **kw: widths.append(x.shape[-1]) or topk(x, *a, **kw))
    nb = nearest_neighbors(q, r, k=50, block_size=block_size)
    monkeypatch.undo()
    whole_block = max(widths) >= 1000
    assert whole_block == ties  # pruned unless ties defeat the bound
    ref = naive_l2_matrix(q, r)
    ref_d, _ = ref.topk(50, dim=1, largest=False)
    torch.testing.assert_close(nb.distances.double(), ref_d, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref.gather(1, nb.indices), ref_d, atol=1e-6, rtol=0)
    assert all(len(set(row)) == 50 for row in nb.indices.tolist())  # 50 distinct references per query
