"""Images of training data reach a dashboard only when the user opts in (wandb offline here)."""

from __future__ import annotations

import json

from pathlib import Path

import pytest

from privdiff.cli import run_fit_cli

REPO = Path(__file__).resolve().parents[2]


def _media(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "wandb").rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".jpeg")]


@pytest.mark.slow
@pytest.mark.parametrize("opt_in", [False, True])
def test_wandb_gets_training_images_only_when_asked(tmp_path, monkeypatch, opt_in: bool) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # A model that memorizes nothing would log no cases: plant copies by making the audit's
    # delta loose enough that the (untrained) model's samples "match" (we test the plumbing).
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/audit/fast.yaml",
                 "--run_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                 "--data.num_members", "16", "--data.num_heldout", "8", "--audit.num_samples", "8",
                 "--audit.attacks", json.dumps({"extraction": {"class_path": "privdiff.eval.extraction.ExtractionAttack", "init_args": {"calibrated_threshold": 100}}}),
                 "--logging.wandb", "true", "--logging.log_training_images", str(opt_in).lower()])
    assert (tmp_path / "audit_cases.safetensors").is_file()  # the cases exist, on local disk
    assert (tmp_path / "wandb").is_dir()
    assert bool(_media(tmp_path)) is opt_in
