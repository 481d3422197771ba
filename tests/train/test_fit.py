"""`privdiff fit` through the real LightningCLI on the built-in digits."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from privdiff.cli import run_fit_cli

REPO = Path(__file__).resolve().parents[2]


def fit(tmp_path: Path, *extra: str):
    return run_fit_cli(
        ["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "--run_dir", str(tmp_path), *extra]
    )


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_fit_lowers_the_loss_and_exports_a_diffusers_model(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    fit(tmp_path, "--trainer.max_steps", "150", "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false", "--audit", "null")
    values = losses(tmp_path)
    assert len(values) >= 20
    assert sum(values[-5:]) / 5 < 0.6 * sum(values[:3]) / 3
    for name in ("config.yaml", "manifest.json", "checkpoints/last.ckpt", "model/model_index.json"):
        assert (tmp_path / name).exists(), name
    pipe = DDPMPipeline.from_pretrained(tmp_path / "model")
    images = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 1)


def test_fit_resumes_from_last_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    fit(tmp_path, "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--audit", "null")
    cli = fit(tmp_path, "--trainer.max_steps", "5", "--ckpt_path", "last", "--trainer.enable_progress_bar", "false", "--audit", "null")
    assert cli.trainer.global_step == 5
