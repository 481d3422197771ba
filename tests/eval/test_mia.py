"""Membership inference: the audit against scikit-learn, each attack against a naive per-example loop, and
planted ground truth (a denoiser that is exact on members only; a tiny model overfit on 8 images)."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from privdiff.eval.mia_attacks import (
    MIAResult,
    attack_noise,
    audit,
    best_over_timesteps,
    loss_scores,
    loss_threshold_attack,
    pia_scores,
    secmi_scores,
)
from privdiff.model import Batch, DiffusionModel
from privdiff.train.denoiser import build_scheduler, build_unet
from privdiff.train.pixel import PixelDiffusion


def tiny_denoiser(num_classes=None, seed=0) -> PixelDiffusion:
    torch.manual_seed(seed)
    unet = build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(), norm_num_groups=8, num_classes=num_classes)
    return PixelDiffusion.from_parts(unet, build_scheduler()).eval()


# -- audit --------------------------------------------------------------------------------------------


def naive_tpr_at_fpr(y, s, level):
    fpr, tpr, _ = roc_curve(y, s)
    return max(t for f, t in zip(fpr, tpr) if f <= level)


def test_audit_perfect_scores():
    is_member = torch.tensor([True] * 50 + [False] * 150)
    scores = torch.where(is_member, 1.0, 0.0) + torch.rand(200) * 0.5
    r = audit(scores, is_member)
    assert isinstance(r, MIAResult)
    assert r.auc == pytest.approx(1.0)
    assert r.tpr_at_1pct_fpr == pytest.approx(1.0) and r.tpr_at_0_1pct_fpr == pytest.approx(1.0)
    assert (r.num_members, r.num_nonmembers) == (50, 150)
    assert set(r.to_dict()) == {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "num_members", "num_nonmembers"}
    assert audit(-scores, is_member).auc == pytest.approx(0.0)


def test_audit_random_scores_auc_near_half():
    g = torch.Generator().manual_seed(0)
    is_member = torch.rand(4000, generator=g) < 0.5
    r = audit(torch.randn(4000, generator=g), is_member)
    assert abs(r.auc - 0.5) < 0.03
    assert r.tpr_at_1pct_fpr < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_audit_matches_sklearn(seed, scale):
    # scale 1e4: scores far outside [0, 1] (summed squared errors); torchmetrics would squash them with a
    # sigmoid into ties unless the audit ranks them first
    rng = np.random.default_rng(seed)
    n = 3000
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 0.8 * y
    s = np.round(s, 1) * scale - 5 * scale  # ties, and all-negative scores
    r = audit(torch.tensor(s), torch.tensor(y))
    assert r.auc == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert r.tpr_at_1pct_fpr == pytest.approx(naive_tpr_at_fpr(y, s, 0.01), abs=1e-6)
    assert r.tpr_at_0_1pct_fpr == pytest.approx(naive_tpr_at_fpr(y, s, 0.001), abs=1e-6)


def test_audit_validates_input():
    with pytest.raises(ValueError, match="same length"):
        audit(torch.zeros(3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="both members and non-members"):
        audit(torch.zeros(3), torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="NaN"):
        audit(torch.tensor([0.0, float("nan")]), torch.tensor([True, False]))


def test_best_over_timesteps_picks_the_best_column():
    g = torch.Generator().manual_seed(0)
    is_member = torch.arange(40) < 20
    noise_col = torch.randn(40, generator=g)
    good_col = is_member.float() + 0.1 * torch.randn(40, generator=g)
    matrix = torch.stack([noise_col, good_col, -good_col], dim=1)
    col, t = best_over_timesteps(matrix, is_member, timesteps=(10, 50, 100))
    assert t == 50 and torch.equal(col, good_col)
    assert best_over_timesteps(matrix, is_member)[1] == 1


# -- attacks against naive per-example loops -----------------------------------------------------------


def naive_eps(den, x, t, y):
    labels = None if y is None else y.view(1)
    return den.trainable(x, torch.tensor([t]), class_labels=labels).sample


@pytest.fixture
def setup():
    den = tiny_denoiser(num_classes=3)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.tensor([0, 2, 1, 1, 0])
    abar = [float(a) for a in den.scheduler.alphas_cumprod]
    return den, images, labels, abar


def test_loss_scores_match_naive_loop(setup):
    den, images, labels, abar = setup
    timesteps = (5, 100, 400)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    got = loss_scores(den, images, labels, timesteps, seed=7, batch_size=2)
    want = torch.empty(5, 3)
    with torch.no_grad():
        for i in range(5):
            for j, t in enumerate(timesteps):
                x_t = math.sqrt(abar[t]) * images[i : i + 1] + math.sqrt(1 - abar[t]) * noise[i : i + 1]
                want[i, j] = -((noise[i : i + 1] - naive_eps(den, x_t, t, labels[i])) ** 2).sum()
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # reproducible, batch-size invariant, and the seed matters
    torch.testing.assert_close(loss_scores(den, images, labels, timesteps, seed=7, batch_size=5), got)
    assert not torch.allclose(loss_scores(den, images, labels, timesteps, seed=8), got)
    torch.testing.assert_close(attack_noise(images, 7), noise)


def test_pia_scores_match_naive_loop(setup):
    den, images, labels, abar = setup
    t, p = 200, 4
    got = pia_scores(den, images, labels, t=t, p=p, batch_size=2)
    want = torch.empty(5)
    with torch.no_grad():
        for i in range(5):
            x0 = images[i : i + 1]
            eps0 = naive_eps(den, x0, 0, labels[i])
            x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps0
            want[i] = -((eps0 - naive_eps(den, x_t, t, labels[i])).abs() ** p).sum()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pia_scores(den, images, labels, t=t, p=p), got)  # deterministic


def test_secmi_scores_match_naive_loop(setup):
    den, images, labels, abar = setup
    t_sec, k = 30, 10

    def step(x, t_from, t_to, y):  # deterministic DDIM move with eps_theta(x, t_from)
        eps = naive_eps(den, x, t_from, y)
        x0 = (x - math.sqrt(1 - abar[t_from]) * eps) / math.sqrt(abar[t_from])
        return math.sqrt(abar[t_to]) * x0 + math.sqrt(1 - abar[t_to]) * eps

    got = secmi_scores(den, images, labels, t_sec=t_sec, k=k, batch_size=3)
    want = torch.empty(5)
    with torch.no_grad():
        for i in range(5):
            x = images[i : i + 1]
            for t in (0, 10, 20):  # x0 -> x_10 -> x_20 -> x_30
                x = step(x, t, t + k, labels[i])
            back = step(step(x, 30, 40, labels[i]), 40, 30, labels[i])
            want[i] = -((back - x) ** 2).sum()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_attacks_validate_and_restore_training_mode(setup):
    den, images, labels, _ = setup
    den.train()
    pia_scores(den, images, labels)
    assert den.training
    with pytest.raises(ValueError, match="t_sec must be a positive multiple"):
        secmi_scores(den, images, labels, t_sec=25, k=10)
    with pytest.raises(ValueError, match="timestep"):
        loss_scores(den, images, labels, timesteps=(1000,))
    with pytest.raises(ValueError, match="cond .* 2 entries for 5 images"):
        pia_scores(den, images, labels[:2])


# -- planted ground truth -------------------------------------------------------------------------------


class MemberOracle(DiffusionModel):
    """A fake denoiser that knows the members: on a member's noising path (x_t / sqrt(abar_t) within
    ``radius`` of that member) it returns the exact noise, elsewhere a wrong, x- and t-dependent guess."""

    def __init__(self, members, scheduler, radius=3.0):
        super().__init__()
        self.register_buffer("members", members.flatten(1))
        self.scheduler, self.trainable = scheduler, nn.Identity()
        self.radius = radius

    image_shape = property(lambda self: (1, 8, 8))
    encode = decode = sample = save_pretrained = from_pretrained = None  # not used by the attacks

    def predict_noise(self, x_t, t, cond=None):
        abar = self.alphas_cumprod()[t].view(-1, 1, 1, 1)
        dist, idx = torch.cdist((x_t / abar.sqrt()).flatten(1), self.members).min(1)
        m = self.members[idx].view_as(x_t)
        exact = (x_t - abar.sqrt() * m) / (1 - abar).sqrt()
        wrong = torch.sin(3 * x_t + 0.01 * t.view(-1, 1, 1, 1).float())
        return torch.where((dist < self.radius).view(-1, 1, 1, 1), exact, wrong)


def test_all_attacks_separate_members_for_an_oracle_denoiser():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1  # random images: pairwise distances ~6.5
    is_member = torch.arange(24) < 8
    oracle = MemberOracle(images[is_member], build_scheduler())
    loss = loss_threshold_attack(oracle, images, is_member, timesteps=(5, 20, 50))
    assert all(r.auc == pytest.approx(1.0) for r in loss.per_timestep.values())
    assert loss.best.tpr_at_1pct_fpr == pytest.approx(1.0)
    assert audit(pia_scores(oracle, images, t=200), is_member).auc == pytest.approx(1.0)
    assert audit(secmi_scores(oracle, images, t_sec=100, k=10), is_member).auc == pytest.approx(1.0)


def test_loss_attack_finds_members_of_an_overfit_tiny_model():
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:24], dtype=torch.float32)[:, None] / 16 * 2 - 1
    members, is_member = digits[:8], torch.arange(24) < 8
    den = tiny_denoiser(seed=0).train()
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = den.per_example_loss(Batch((members + 1) / 2, None, torch.arange(8)), generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = loss_threshold_attack(den.eval(), digits, is_member, timesteps=(10, 50, 100))
    assert result.best.auc > 0.8, result.to_dict()
    assert result.best_timestep in (10, 50, 100)
    assert result.best.auc == max(r.auc for r in result.per_timestep.values())


# -- honest figures: cross-fitting, intervals, resolution -------------------------------------------------
def test_the_fast_auc_and_tpr_of_the_bootstrap_equal_the_audits() -> None:
    from privdiff.eval import mia_stats

    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(5, 80))
        s = rng.normal(size=2 * n).round(1)
        s[:n] += rng.uniform(0, 2)
        m = np.arange(2 * n) < n
        ref = audit(torch.tensor(s), torch.tensor(m))
        assert mia_stats.auc(s, m) == pytest.approx(ref.auc, abs=1e-6)
        assert mia_stats.tpr_at(s, m, 0.01) == pytest.approx(ref.tpr_at_1pct_fpr, abs=1e-6)


def test_crossfitting_removes_the_optimism_of_choosing_the_best_of_many_null_attacks() -> None:
    from privdiff.eval import mia_stats

    rng = np.random.default_rng(1)
    n = 64
    candidates = {f"noise{i}": rng.normal(size=2 * n) for i in range(20)}  # 20 attacks that know nothing
    m = np.arange(2 * n) < n
    in_sample = max(mia_stats.auc(c, m) for c in candidates.values())
    fitted = mia_stats.crossfit(candidates, n, seed=0)
    assert in_sample > 0.58  # picking the best of 20 on the same pairs looks like leakage...
    assert fitted["auc_interval"][0] < 0.5 < fitted["auc_interval"][1]  # ... cross-fitted, it is chance
    assert fitted["fpr"] == pytest.approx(1 / 32)  # 32 non-members a fold: no FPR below 1/32 is resolved


def test_an_untrained_model_is_at_chance_with_intervals_that_contain_one_half(tmp_path) -> None:
    from privdiff.eval.audit import AuditConfig, AuditData, run_audit
    from privdiff.eval.mia import MembershipInference
    from privdiff.train.data import load_builtin

    pool = load_builtin("digits", 8, 1)
    data = AuditData(pool.select(range(64)), pool.select(range(64, 192)), torch.ones(64, dtype=torch.long))
    config = AuditConfig(num_samples=4, progress=False, attacks={"mia": MembershipInference(loss_timesteps=[10, 100, 300], secmi_k=10)})
    result = run_audit(tiny_denoiser(), data, config)["mia"]
    for attack in ("loss", "pia", "secmi", "best"):
        lo, hi = result[attack]["auc_interval"]
        assert lo < 0.5 < hi, (attack, result[attack]["auc"], lo, hi)
        assert result[attack]["verdict"] == "chance"
