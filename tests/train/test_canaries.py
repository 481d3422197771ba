"""Input canaries in the data stage: each trained on with probability 1/2, recorded in the manifest by stable id,
never members, and read back the same by a resume and by a later audit."""

from __future__ import annotations

import pytest
import torch

from privdiff.eval.audit import datamodule_audit_data, load_audit_data
from privdiff.membership import Manifest
from privdiff.train.canaries import Canaries, builtin_canaries, draw_canaries
from privdiff.train.data import DiffusionDataModule


def datamodule(tmp_path, source: str = "digits", seed: int = 0, count: int = 200, **kw) -> DiffusionDataModule:
    dm = DiffusionDataModule(source=source, image_size=8, num_members=32, num_heldout=32, seed=seed, run_dir=str(tmp_path),
                             canaries=Canaries(count=count), **kw)
    dm.setup("fit")
    return dm


def test_canaries_are_trained_on_by_the_recorded_draw_and_are_never_members(tmp_path) -> None:
    dm = datamodule(tmp_path)
    entry = Manifest.load(tmp_path / "manifest.json").canaries
    included, excluded = set(entry["included"]), set(entry["excluded"])
    assert len(included) + len(excluded) == 200 and not included & excluded
    assert 60 < len(included) < 140  # Binomial(200, 1/2): outside this with probability < 1e-8
    train = set(dm.manifest.train)
    assert included <= train and not excluded & train
    assert not (included | excluded) & (set(dm.manifest.members) | set(dm.manifest.heldout))
    assert len(dm.train_set) == 32 + len(included)  # what DP-SGD's sampling rate and accountant see
    data = datamodule_audit_data(dm)
    assert data.canaries is not None and data.canary_included.sum() == len(included)
    assert all(i.startswith("canary:") for i in data.canaries.ids) and len(data.members) == 32


def test_the_draw_is_its_own_stream_reproducible_by_seed_and_read_back_by_a_later_audit(tmp_path) -> None:
    table = builtin_canaries(300, 8, 1)
    first = draw_canaries(table, seed=0).included
    assert torch.equal(first, draw_canaries(table, seed=0).included)
    assert not torch.equal(first, draw_canaries(table, seed=1).included)
    with_canaries, without = datamodule(tmp_path / "a"), DiffusionDataModule(source="digits", image_size=8, num_members=32,
                                                                             num_heldout=32, seed=0)
    without.setup("fit")
    assert with_canaries.manifest.members == without.manifest.members  # canaries change nothing of the split
    again = load_audit_data(Manifest.load(tmp_path / "a" / "manifest.json"))
    assert torch.equal(again.canary_included, with_canaries.canaries.included)
    assert torch.equal(again.canaries.images, with_canaries.canaries.table.images)
    datamodule(tmp_path / "a")  # a resume into the same run directory sees the same draw
    with pytest.raises(ValueError, match="no longer match the manifest"):
        datamodule(tmp_path / "a", count=100)


def test_builtin_canaries_are_distinct_and_unlike_the_data_and_captioned_for_text_models(tmp_path) -> None:
    table = builtin_canaries(256, 16, 3, captioned=True)
    flat = table.unit().flatten(1)
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5 + torch.eye(256)
    assert distances.min() > 0.05  # no two canaries are near-copies
    assert len(set(table.captions)) == 256
    dm = datamodule(tmp_path, source="captioned_digits", count=64)
    assert dm.canaries.table.captions is not None and not set(dm.canaries.table.captions) & set(dm.train_set.captions[:32])
    digits = dm.members.unit().flatten(1)
    canaries = dm.canaries.table.unit().flatten(1)
    assert (torch.cdist(canaries, digits) / digits.shape[1] ** 0.5).min() > 0.1  # far from every member


def test_a_class_conditional_run_gives_every_canary_a_class(tmp_path) -> None:
    dm = datamodule(tmp_path, count=30)
    assert dm.manifest.num_classes == 10
    assert (dm.canaries.table.labels == torch.arange(30) % 10).all()


def test_bad_canary_settings_are_refused_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match="count must be >= 2"):
        Canaries(count=1)
    with pytest.raises(FileNotFoundError, match="canary folder"):
        Canaries(path=str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_a_dp_fit_with_canaries_reports_the_black_box_bound_and_a_later_audit_agrees(tmp_path, monkeypatch) -> None:
    import json
    from pathlib import Path

    from privdiff.cli import run_fit_cli
    from privdiff.eval.audit import AuditConfig, audit_saved
    from privdiff.eval.one_run import CanaryAudit

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/data/canaries.yaml",
                 "-c", "configs/defense/dp_sgd.yaml", "-c", "configs/audit/fast.yaml", "--run_dir", str(tmp_path),
                 "--trainer.max_steps=4", "--trainer.enable_progress_bar=false", "--data.num_members=24",
                 "--data.num_heldout=16", "--data.canaries.count=64", "--audit.num_samples=8",
                 "--audit.attacks.mia.examples=8", "--audit.attacks.canaries.init_args.noise_draws=1"])
    found = json.loads((tmp_path / "audit.json").read_text())["canaries"]
    assert found["m"] == 64 and found["claimed_epsilon"] == pytest.approx(10.0, rel=0.01)
    assert found["verdict"] == "consistent (no answer: above the ceiling)" and found["epsilon"] < found["ceiling"]
    config = AuditConfig(seed=found_seed(tmp_path), progress=False, attacks={"canaries": CanaryAudit(noise_draws=1)})
    again = audit_saved(run=str(tmp_path), audit=config, out=str(tmp_path / "again"))["canaries"]
    assert again["is_included"] == found["is_included"] and again["claimed_epsilon"] == found["claimed_epsilon"]
    assert again["scores"] == pytest.approx(found["scores"], rel=1e-4, abs=1e-6)


def found_seed(run_dir) -> int:
    import json

    return json.loads((run_dir / "audit.json").read_text())["config"]["seed"]
