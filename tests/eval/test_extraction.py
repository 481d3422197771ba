"""Extraction attacks on planted ground truth: a fake "model" that emits noisy training images."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from privdiff.eval.carlini import (
    ExtractionResult,
    _clique_members,
    calibrated_extraction,
    generate_and_filter,
)

torch.set_num_threads(1)


def smooth_images(n: int, g: torch.Generator, size: int = 32, channels: int = 3, low: int = 4) -> torch.Tensor:
    """Random smooth images in [0, 1]: low-resolution noise upsampled bilinearly."""
    x = torch.rand(n, channels, low, low, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def noisy_copies(images: torch.Tensor, copies: int, sigma: float, g: torch.Generator) -> torch.Tensor:
    x = images.repeat_interleave(copies, dim=0)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def planted():
    """200 training images; the model copies 20 of them 12 times each and also emits 200 new images."""
    g = torch.Generator().manual_seed(0)
    train = smooth_images(200, g)
    memorized = torch.randperm(200, generator=g)[:20]
    copies = noisy_copies(train[memorized], 12, 0.02, g)
    novel = smooth_images(200, g)
    samples = torch.cat([copies, novel])
    perm = torch.randperm(samples.shape[0], generator=g)
    source = torch.cat([memorized.repeat_interleave(12), torch.full((200,), -1)])[perm]
    return train, samples[perm], source, set(memorized.tolist())


def recall(result: ExtractionResult, truth: set[int]) -> float:
    return len(set(result.extracted_indices) & truth) / len(truth)


def test_generate_and_filter_finds_planted_copies(planted):
    train, samples, source, truth = planted
    res = generate_and_filter(samples, train)
    assert res.params["tile_size"] == 8
    assert recall(res, truth) >= 0.9
    assert set(res.extracted_indices) <= truth  # no false positives
    # only copies are flagged, and every record points at the image its sample was copied from
    assert res.num_samples_flagged <= 240 and res.num_samples_flagged >= 0.9 * 240
    for rec in res.records:
        assert source[rec.sample_index].item() == rec.train_index
        assert rec.distance <= 0.15
    assert len(res.records) == len(res.extracted_indices)
    json.dumps(res.to_dict())


def test_generate_and_filter_record_is_closest_flagged_sample(planted):
    train, samples, source, _ = planted
    res = generate_and_filter(samples, train)
    for rec in res.records[:5]:
        mine = (source == rec.train_index).nonzero().squeeze(1)
        d = (samples[mine] - train[rec.train_index]).pow(2).flatten(1).mean(1).sqrt()
        assert rec.distance == pytest.approx(d.min().item(), abs=1e-6)


def test_generate_and_filter_with_labels(planted):
    train, samples, source, truth = planted
    # labels that split each memorized image's copies across two groups of 6: no clique of 10
    labels = torch.arange(samples.shape[0]) % 2
    for t in truth:
        mine = (source == t).nonzero().squeeze(1)
        labels[mine] = torch.arange(mine.numel()) % 2
    res = generate_and_filter(samples, train, labels=labels)
    assert res.extracted_indices == [] and res.num_samples_flagged == 0
    # labels that keep each image's copies together (as a class label would) find them again
    labels = torch.where(source >= 0, source % 3, torch.arange(samples.shape[0]) % 3)
    res = generate_and_filter(samples, train, labels=labels)
    assert recall(res, truth) >= 0.9


def test_generate_and_filter_unrelated_samples_extract_nothing():
    g = torch.Generator().manual_seed(1)
    train = smooth_images(200, g)
    novel = smooth_images(300, g)
    noise = torch.rand(100, 3, 32, 32, generator=g)
    res = generate_and_filter(torch.cat([novel, noise]), train)
    assert res.extracted_indices == [] and res.num_samples_flagged == 0


def test_generate_and_filter_needs_a_large_clique():
    """Fewer copies than min_clique: the black-box attack cannot see them."""
    g = torch.Generator().manual_seed(2)
    train = smooth_images(50, g)
    samples = noisy_copies(train[:5], 6, 0.02, g)
    assert generate_and_filter(samples, train).extracted_indices == []
    assert generate_and_filter(samples, train, min_clique=6).extracted_indices == [0, 1, 2, 3, 4]


def test_calibrated_extraction_finds_planted_copies(planted):
    train, samples, source, truth = planted
    res = calibrated_extraction(samples, train)
    assert res.method == "calibrated_l2"
    assert recall(res, truth) >= 0.9
    assert set(res.extracted_indices) <= truth
    assert res.num_samples_flagged >= 0.9 * 240
    for rec in res.records:
        assert rec.score is not None and rec.score < 1
        assert source[rec.sample_index].item() == rec.train_index
    json.dumps(res.to_dict())


def test_calibrated_extraction_unrelated_samples_extract_nothing():
    g = torch.Generator().manual_seed(3)
    train = smooth_images(200, g)
    samples = torch.cat([smooth_images(200, g), torch.rand(50, 3, 32, 32, generator=g)])
    res = calibrated_extraction(samples, train)
    assert res.extracted_indices == [] and res.num_samples_flagged == 0


def brute_force_in_clique(adj: torch.Tensor, size: int) -> set[int]:
    """Vertices lying in some clique of exactly `size` vertices (exhaustive; tiny graphs only)."""
    n = adj.shape[0]
    members: set[int] = set()
    for combo in itertools.combinations(range(n), size):
        idx = torch.tensor(combo)
        if bool(adj[idx][:, idx].sum() == size * (size - 1)):
            members.update(combo)
    return members


@pytest.mark.parametrize("seed", range(6))
def test_clique_approximation_is_sound_and_finds_planted_cliques(seed):
    g = torch.Generator().manual_seed(seed)
    n = 14
    upper = torch.rand(n, n, generator=g) < 0.35
    adj = torch.triu(upper, diagonal=1)
    adj = adj | adj.T
    clique = torch.randperm(n, generator=g)[:5]
    adj[clique.unsqueeze(1), clique.unsqueeze(0)] = True
    adj.fill_diagonal_(False)
    flagged = set(_clique_members(adj, 5).nonzero().squeeze(1).tolist())
    exact = brute_force_in_clique(adj, 5)
    assert flagged <= exact  # never flags a vertex outside a clique of that size
    assert set(clique.tolist()) <= flagged or len(exact) > 5  # planted clique found when unambiguous


def test_clique_members_star_is_not_a_clique():
    n = 12
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj[0, 1:] = True
    adj[1:, 0] = True  # a hub with 11 neighbours, none adjacent to each other
    assert not _clique_members(adj, 3).any()
    adj[1:4, 1:4] = True  # now {0, 1, 2, 3} is a clique
    adj.fill_diagonal_(False)
    assert _clique_members(adj, 4).nonzero().squeeze(1).tolist() == [0, 1, 2, 3]


def test_validation():
    x = torch.rand(12, 1, 8, 8)
    with pytest.raises(ValueError, match="tau"):
        generate_and_filter(x, x, tau=0)
    with pytest.raises(ValueError, match="labels"):
        generate_and_filter(x, x, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        generate_and_filter(x, x, tile_size=3)
    with pytest.raises(ValueError, match="threshold"):
        calibrated_extraction(x, x, threshold=0)


class Decoder:
    """A model whose decoder returns its latent shifted by ``offset`` (0: a pixel model)."""

    device = torch.device("cpu")

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z + self.offset).clamp(0, 1)


@pytest.fixture(scope="module")
def digit_split():
    from privdiff.train.data import load_builtin

    pool = load_builtin("digits", 16, 1)
    return pool.select(range(64)), pool.select(range(64, 264)), pool.select(range(264, 464)), pool.select(range(464, 1464))


def _run(attack, model, split, samples):
    from privdiff.eval.plugin import AuditContext, AuditData

    members, calibration, heldout, _ = split
    context = AuditContext(model=model, data=AuditData(members, heldout, torch.ones(len(members), dtype=torch.long)),
                           samples=samples, calibration=calibration, heldout=heldout)
    return attack.run(context)


def test_a_latent_copy_is_confirmed_through_the_decoder_and_a_count_without_it_is_a_lower_bound_per_member(digit_split):
    from privdiff.eval.extraction import ExtractionAttack

    members = digit_split[0]
    exact = _run(ExtractionAttack(min_clique=5), Decoder(0.0), digit_split, members.unit()[:4].repeat_interleave(6, 0))
    assert exact.summary["union"]["extracted"] == 4 and exact.summary["reconstruction_floor"]["beyond_delta"] == 0
    assert exact.summary["spaces"] == ["pixel"]  # a pixel model's round trip is the identity: one space
    assert exact.columns()[0].text.startswith("4 (6.2%) · chance 0.0 [0.0, ") and not any("decoder" in n for n in exact.notes())

    blurred = Decoder(0.3)  # every decoding lies 0.3 (before clipping) from its member, far beyond delta
    latent_copies = blurred.decode(blurred.encode(members.unit()[:4])).repeat_interleave(6, 0)
    blind = _run(ExtractionAttack(min_clique=5, decoded=False), blurred, digit_split, latent_copies)
    floor = blind.summary["reconstruction_floor"]
    assert floor["beyond_delta"] == 64 and floor["unconfirmable"] == 64 and floor["median_l2"] > floor["delta"]
    assert blind.summary["union"]["extracted"] == 0 and blind.columns()[0].text.endswith(", lower bound")
    assert any("lower bounds for these 64 members (digits/00000" in n for n in blind.notes())

    seen = _run(ExtractionAttack(min_clique=5), blurred, digit_split, latent_copies)
    assert seen.summary["spaces"] == ["pixel", "decoded"]
    assert seen.summary["union"]["extracted"] == 4 and seen.summary["union"]["control"]["above_chance"]
    assert seen.summary["reconstruction_floor"]["unconfirmable"] == 0 and not seen.columns()[0].text.endswith("lower bound")
    assert {m for m in seen.cases().flagged_by} <= {"generate_and_filter (decoded)", "calibrated_l2 (decoded)"}
    assert any("compared with the members' own decodings" in n for n in seen.notes())


def test_chance_flags_are_counted_in_the_control_not_presented_as_extractions(digit_split):
    """Novel samples from the members' own distribution: the members' count stays within what the control gives,
    and planted copies among them are counted with no more beside them than the control allows."""
    from privdiff.eval.extraction import ExtractionAttack

    members, _, _, novel = digit_split
    attack = ExtractionAttack(min_clique=5)
    chance = _run(attack, Decoder(0.0), digit_split, novel.unit())
    control = chance.summary["union"]["control"]
    assert control["num_control"] == 200 and control["num_members"] == 64
    assert not control["above_chance"] and control["flagged"] <= control["interval"][1] + 1
    assert "not above" in chance.columns()[0].text
    planted = torch.cat([members.unit()[:3].repeat_interleave(8, 0), novel.unit()])
    found = _run(attack, Decoder(0.0), digit_split, planted)
    union = found.summary["union"]
    assert {members.ids[i] for i in range(3)} <= set(union["ids"])
    assert union["extracted"] - 3 <= union["control"]["interval"][1]
    assert union["control"]["control_flagged"] == control["control_flagged"]  # the copies change nothing held out
    # 3 of 64 against chance flags of 8 of 200 is no count evidence; exact copies are closer than every chance flag
    assert union["control"]["p_value"] > 0.05 and union["control"]["beyond_control"] == 3 and union["control"]["above_chance"]
    assert "· above (p" in found.columns()[0].text and any("3 of the members are closer" in n for n in found.notes())
