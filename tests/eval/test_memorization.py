"""Gu et al. 2023 nearest-neighbour ratio and the extraction-by-copies table."""

import json

import pytest
import torch
import torch.nn.functional as F

from privdiff.eval.carlini import by_copies
from privdiff.eval.memorization import memorization_ratio, nn_ratio

torch.set_num_threads(1)


def smooth_images(n: int, g: torch.Generator, size: int = 16, channels: int = 1, low: int = 4) -> torch.Tensor:
    x = torch.rand(n, channels, low, low, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def test_nn_ratio_matches_naive():
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(40, 1, 6, 6, generator=g)
    samples = torch.cat([torch.rand(15, 1, 6, 6, generator=g), (refs[:5] + 0.01).clamp(0, 1)])
    expected = []
    for s in samples:
        d = sorted(((s - r).pow(2).mean().sqrt().item() for r in refs))
        expected.append(d[0] / d[1])
    torch.testing.assert_close(nn_ratio(samples, refs, block_size=7).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_nn_ratio_exact_copy_is_zero():
    g = torch.Generator().manual_seed(1)
    refs = torch.rand(10, 1, 4, 4, generator=g)
    assert nn_ratio(refs[[3]], refs).item() == 0.0
    # an exact copy of an image present twice in the references: 0/0, defined as 0
    dup = torch.cat([refs, refs[[3]]])
    assert nn_ratio(refs[[3]], dup).item() == 0.0


def test_memorization_ratio_planted():
    g = torch.Generator().manual_seed(2)
    train = smooth_images(100, g)
    memorized = torch.tensor([3, 17, 42, 64, 99])
    copies = (train[memorized].repeat_interleave(8, dim=0) + 0.02 * torch.randn(40, 1, 16, 16, generator=g)).clamp(0, 1)
    novel = smooth_images(160, g)
    res = memorization_ratio(torch.cat([copies, novel]), train)
    assert res.num_samples == 200
    assert bool(res.memorized[:40].all()) and not bool(res.memorized[40:].any())
    assert res.fraction_memorized == pytest.approx(40 / 200)
    assert res.matched_indices == memorized.tolist()
    assert res.num_matched == 5 and res.fraction_matched == pytest.approx(5 / 100)
    assert torch.equal(res.nearest_index[:40], memorized.repeat_interleave(8))
    d = res.to_dict(per_sample=True)
    json.dumps(d)
    assert len(d["ratio"]) == 200 and d["num_memorized"] == 40


def test_memorization_ratio_unrelated_is_zero():
    g = torch.Generator().manual_seed(3)
    train = smooth_images(100, g)
    samples = torch.cat([smooth_images(150, g), torch.rand(50, 1, 16, 16, generator=g)])
    res = memorization_ratio(samples, train)
    assert res.fraction_memorized <= 0.01
    assert res.num_matched <= 2


def test_by_copies_counts():
    copies = torch.tensor([1, 1, 1, 1, 10, 10, 1, 5, 10, 1])
    out = by_copies([4, 5, 0, 4, 7], copies)  # 4 twice: counted once
    assert out == {
        1: {"num_images": 6, "num_extracted": 1, "fraction_extracted": 1 / 6},
        5: {"num_images": 1, "num_extracted": 1, "fraction_extracted": 1.0},
        10: {"num_images": 3, "num_extracted": 2, "fraction_extracted": 2 / 3},
    }
    assert by_copies(torch.tensor([], dtype=torch.long), copies)[10]["num_extracted"] == 0
    json.dumps(out)


def test_validation():
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match="at least 2"):
        nn_ratio(x, x[:1])
    with pytest.raises(ValueError, match="threshold"):
        memorization_ratio(x, x, threshold=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        by_copies([3], torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match=">= 0"):
        by_copies([0], torch.tensor([-1, 2, 1]))
    # 0 copies: a member a data defense removed (merged into its near-duplicate twin) is its own bucket.
    assert by_copies([1], torch.tensor([0, 2, 1]))[0] == {"num_images": 1, "num_extracted": 0, "fraction_extracted": 0.0}
    with pytest.raises(ValueError, match="integer"):
        by_copies([0], torch.tensor([1.0, 2.0]))


def test_the_nn_ratio_count_stands_beside_its_control_of_held_out_images() -> None:
    """Novel digits as samples: the member images they 'copy' by the ratio test stay within what held-out images in
    the members' place give; three exact copies among them are beyond chance."""
    from privdiff.eval.memorization import NNRatioMemorization
    from privdiff.eval.plugin import AuditContext, AuditData
    from privdiff.train.data import load_builtin
    from privdiff.train.pixel import PixelDiffusion

    pool = load_builtin("digits", 16, 1)
    members, calibration, heldout, novel = (pool.select(range(a, b)) for a, b in ((0, 64), (64, 264), (264, 464), (464, 1464)))
    model = PixelDiffusion(16, 1, block_out_channels=(8, 16), attention_levels=(), num_train_timesteps=100)

    def run(samples: torch.Tensor) -> dict:
        context = AuditContext(model=model, data=AuditData(members, heldout, torch.ones(64, dtype=torch.long)), samples=samples,
                               calibration=calibration, heldout=heldout)
        return NNRatioMemorization().run(context).summary["control"]

    chance = run(novel.unit())
    assert chance["num_control"] == 200 and chance["num_members"] == 64 and chance["above_chance"] is False
    copied = run(torch.cat([members.unit()[:3].repeat_interleave(4, 0), novel.unit()]))
    assert copied["flagged"] >= 3 and copied["beyond_control"] == 3 and copied["above_chance"] is True
