"""The audit pipeline end to end with planted ground truth: fake models whose samples we control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from privdiff.defenses.output_filter import OutputFilterDefense
from privdiff.eval.audit import AuditConfig, AuditData, audit_saved, run_audit
from privdiff.eval.report import summarize
from privdiff.train.data import ImageTable, load_builtin
from privdiff.eval.extraction import ExtractionAttack
from privdiff.eval.memorization import NNRatioMemorization
from privdiff.train.pixel import PixelDiffusion

REPO = Path(__file__).resolve().parents[2]


class FakeSampler(PixelDiffusion):
    """A denoiser whose samples are given images (in [0, 1]) plus small noise, cycled."""

    def __init__(self, images: torch.Tensor, noise: float = 0.02) -> None:
        super().__init__(16, 1, block_out_channels=(8, 16), attention_levels=(), num_train_timesteps=100)
        self.images, self.noise, self.cursor = images, noise, 0

    def sample(self, n, solver="ddim", steps=10, cond=None, generator=None):
        rows = (torch.arange(n) + self.cursor) % len(self.images)
        self.cursor += n
        x = self.images[rows] + self.noise * torch.randn(n, *self.images.shape[1:], generator=generator)
        return x.clamp(0, 1)


@pytest.fixture(scope="module")
def digits() -> tuple[ImageTable, ImageTable]:
    pool = load_builtin("digits", 16, 1)
    return pool.select(range(40)), pool.select(range(40, 80))


# Thresholds for 16x16 digits and a small member set (configs/audit/fast.yaml); the published ones
# (delta 0.15, calibrated l2 < 1) flag a third of novel digits, which the threshold check reports.
CONFIG = AuditConfig(num_samples=160, steps=2, batch_size=64, progress=False, attacks={
    "extraction": ExtractionAttack(min_clique=3, tau=0.05, delta=0.05, calibrated_threshold=0.35),
    "memorization": NNRatioMemorization(),
})


def test_copying_model_is_caught_and_the_copies_breakdown_shows_it(digits, tmp_path) -> None:
    members, heldout = digits
    copied = list(range(10))  # the model reproduces these 10 members; copies 5x each in "training"
    copies = torch.ones(len(members), dtype=torch.long)
    copies[copied] = 5
    data = AuditData(members, heldout, copies)
    result = run_audit(FakeSampler(members.unit()[copied]), data, CONFIG, run_dir=tmp_path)
    union = set(result["extraction"]["union"]["ids"])
    recall = len(union & {members.ids[i] for i in copied}) / len(copied)
    assert recall >= 0.9
    for method in ("generate_and_filter", "calibrated_l2"):
        found = {r["id"] for r in result["extraction"][method]["records"]}
        assert len(found & {members.ids[i] for i in copied}) >= 9, method
        assert found <= {members.ids[i] for i in copied}
    assert result["memorization"]["fraction_memorized"] > 0.9
    assert result["extraction"]["by_copies"]["5"]["fraction_extracted"] >= 0.9 and result["extraction"]["by_copies"]["1"]["num_extracted"] == 0
    assert json.loads((tmp_path / "audit.json").read_text())["extraction"]["union"]["extracted"] == len(union)
    assert summarize("x", result)["extracted"] == len(union)


def test_model_of_unrelated_images_extracts_nothing(digits, tmp_path) -> None:
    members, heldout = digits
    data = AuditData(members, heldout, torch.ones(len(members), dtype=torch.long))
    # Held-out digits are the samples: realistic images, but none is a training image.
    result = run_audit(FakeSampler(heldout.unit()), data, CONFIG, run_dir=tmp_path)
    assert result["extraction"]["union"]["extracted"] == 0
    assert result["memorization"]["fraction_memorized"] < 0.1
    check = result["threshold_check"]
    # 20 held-out images flagging none cannot show <= 1% (it takes 368): unresolved, never "ok"
    assert not check["too_loose"] and not check["ok"] and set(check["status"].values()) == {"unresolved"} and check["needed"] == 368


def test_threshold_check_reports_published_thresholds_too_loose_for_tiny_digit_sets(digits) -> None:
    members, heldout = digits
    data = AuditData(members, heldout, torch.ones(len(members), dtype=torch.long))
    with pytest.warns(UserWarning, match="flag real held-out images"):
        check = run_audit(FakeSampler(heldout.unit()), data, AuditConfig(num_samples=8, progress=False, attacks={
        "extraction": ExtractionAttack(tau=0.15, delta=0.15, calibrated_threshold=1.0),  # the published ones
        "memorization": NNRatioMemorization(threshold=1 / 3),
    }))["threshold_check"]
    assert not check["ok"] and check["heldout_flag_rate"]["extraction calibrated_threshold"] > 0.1


def test_output_filter_rejects_copies_and_reports_its_rate(digits) -> None:
    members, heldout = digits
    data = AuditData(members, heldout, torch.ones(len(members), dtype=torch.long))
    fake = FakeSampler(torch.cat([members.unit()[:5], heldout.unit()[:5]]))
    result = run_audit(fake, data, CONFIG, defenses=[OutputFilterDefense(threshold=0.35)])
    assert result["extraction"]["union"]["extracted"] == 0  # every copy was filtered out
    assert 0.3 < result["sampling"]["reject_rate"] < 0.7
    assert "no DP guarantee" in result["defense_metrics"]["defense/output_filter/guarantee"]


def test_audit_of_a_saved_run_matches_and_errors_are_clear(tmp_path, monkeypatch) -> None:
    from privdiff.cli import run_fit_cli

    monkeypatch.chdir(REPO)
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/audit/fast.yaml",
                 "--run_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                 "--data.num_members", "24", "--data.num_heldout", "8", "--audit.num_samples", "16"])
    first = json.loads((tmp_path / "audit.json").read_text())
    fast = AuditConfig(**{**first["config"]})
    again = audit_saved(run=str(tmp_path), audit=fast, out=str(tmp_path / "again"))
    assert again["extraction"]["union"] == first["extraction"]["union"]
    assert again["mia"]["best"]["auc"] == pytest.approx(first["mia"]["best"]["auc"], abs=1e-6)
    assert (tmp_path / "again" / "report.md").is_file()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        audit_saved(model=str(tmp_path), manifest=str(tmp_path / "manifest.json"), audit=fast)
    with pytest.raises(ValueError, match="exactly one of --run"):
        audit_saved(audit=fast)


def test_exact_duplicate_files_are_one_group_and_a_sample_copying_them_is_flagged(digits) -> None:
    members, heldout = digits
    twins = ImageTable.concat([members, members.select([0, 1, 2])])  # three pictures present as two files each
    twins.ids[-3:] = ["dup-a", "dup-b", "dup-c"]
    groups = torch.arange(len(twins))
    groups[-3:] = torch.tensor([0, 1, 2])
    copies = torch.ones(len(twins), dtype=torch.long)
    config = AuditConfig(num_samples=24, steps=1, progress=False, attacks={"memorization": NNRatioMemorization(threshold=1 / 3),
                                                                          "extraction": ExtractionAttack(min_clique=3)})
    samples = members.unit()[[0, 1, 2]].repeat(8, 1, 1, 1)  # the model reproduces the three duplicated pictures (+ noise)
    alone = run_audit(FakeSampler(samples, noise=0.01), AuditData(twins, heldout, copies), config)
    grouped = run_audit(FakeSampler(samples, noise=0.01), AuditData(twins, heldout, copies, groups=groups), config)
    # Without groups the second nearest member is the other file of the same picture: ratio ~1, never flagged.
    assert alone["memorization"]["fraction_memorized"] == 0
    assert grouped["memorization"]["fraction_memorized"] == 1 and grouped["memorization"]["matched_indices"] == [0, 1, 2]
    assert grouped["extraction"]["union"]["extracted"] == 3  # three pictures, not six files
    assert grouped["extraction"]["by_copies"]["2"] == {"num_images": 3, "num_extracted": 3, "fraction_extracted": 1.0}
    assert grouped["data"]["num_member_groups"] == len(members)


class Saturating(FakeSampler):
    """Samples pushed to black and white: by every solver, or only by the ones named."""

    def __init__(self, images: torch.Tensor, solvers: tuple[str, ...] | None = None) -> None:
        super().__init__(images)
        self.solvers = solvers

    def sample(self, n, solver="ddim", steps=10, cond=None, generator=None):
        x = super().sample(n, solver, steps, cond, generator)
        return (x > 0.3).float() if self.solvers is None or solver in self.solvers else x


@pytest.mark.parametrize("solvers", [None, ("ancestral",)])
def test_saturated_samples_are_blamed_on_the_solver_only_when_another_solver_on_the_same_weights_is_sane(digits, solvers) -> None:
    members, heldout = digits
    data = AuditData(members, heldout, torch.ones(len(members), dtype=torch.long))
    config = AuditConfig(num_samples=32, steps=2, progress=False, attacks={"memorization": NNRatioMemorization()})
    expected = "every solver gives saturated samples" if solvers is None else "Set audit.solver: ddim"
    with pytest.warns(UserWarning, match=expected):
        sampling = run_audit(Saturating(members.unit(), solvers), data, config)["sampling"]
    check = sampling["solver_check"]
    assert set(check["solvers"]) == {"ancestral", "ddim", "dpmsolver++"}
    assert check["model_saturated"] is (solvers is None)
    assert check["sane"] == ([] if solvers is None else ["ddim", "dpmsolver++"])


def test_an_audit_attack_that_cannot_be_loaded_is_named_before_anything_runs() -> None:
    from privdiff.eval.audit import AuditConfig

    with pytest.raises(ValueError, match="privdiff.eval.nope.Attack"):
        AuditConfig(attacks={"nope": {"class_path": "privdiff.eval.nope.Attack"}}).check(64, 64)
    with pytest.raises(ValueError, match="is not a privdiff.eval.plugin.AuditPlugin"):
        AuditConfig(attacks={"dedup": {"class_path": "privdiff.defenses.dedup.DedupDefense"}}).check(64, 64)
