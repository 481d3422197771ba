"""The GAN baseline: fit through the CLI with the audit, export and reload, DP-SGD on the discriminator, LOGAN on a
memorizing discriminator, and planted duplicates extracted from a GAN trained long on few images."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.cli import run_fit_cli
from privdiff.eval import mia_stats
from privdiff.model import Batch
from privdiff.train.data import load_builtin
from privdiff.train.gan import DCGAN
from privdiff.train.models import load_model

REPO = Path(__file__).resolve().parents[2]
AUDIT = """
audit:
  num_samples: {samples}
  steps: 1
  batch_size: 128
  progress: false
  attacks:
    quality:
      class_path: privdiff.eval.quality.SampleQuality
      init_args: {{backbone: classifier}}
    extraction:
      class_path: privdiff.eval.extraction.ExtractionAttack
      init_args: {{min_clique: 4}}
    memorization:
      class_path: privdiff.eval.memorization.NNRatioMemorization
    mia:
      class_path: privdiff.eval.mia.MembershipInference
      init_args: {{examples: 16}}
    gan_mia:
      class_path: privdiff.eval.gan_mia.DiscriminatorMIA
"""


def _fit(tmp_path: Path, name: str, steps: int, samples: int, *extra: str) -> dict:
    (tmp_path / "audit.yaml").write_text(textwrap.dedent(AUDIT.format(samples=samples)))
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/model/gan.yaml",
                 "-c", str(tmp_path / "audit.yaml"), "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                 "--trainer.max_steps", str(steps), "--run_dir", str(tmp_path / name), *extra])
    return json.loads((tmp_path / name / "audit.json").read_text())


def test_a_gan_fits_through_the_cli_and_its_audit_runs_the_sample_attacks(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    audit = _fit(tmp_path, "gan", 6, 64, "--data.num_members", "24", "--data.num_heldout", "48", "--data.batch_size", "8",
                 "--model.diffusion.init_args.width", "8")
    assert audit["run"]["steps"] == 6  # one global step per batch, though two optimizers step
    assert audit["model"]["kind"] == "gan"
    assert "controls" in audit["extraction"] and "control" in audit["memorization"] and "fid" in json.dumps(audit["quality"])
    assert "not_applicable" in audit["mia"] and "n/a" in audit["plugins"]["mia"]["notes"][0]
    assert [c["text"] for c in audit["plugins"]["mia"]["columns"]] == ["n/a"]
    assert 0 <= audit["gan_mia"]["auc"] <= 1 and audit["gan_mia"]["num_members"] == 24
    # the export: not a diffusers pipeline, read back by the model loader, the same samples
    model = load_model(tmp_path / "gan" / "model")
    assert isinstance(model, DCGAN) and not (tmp_path / "gan" / "model" / "model_index.json").exists()
    again = DCGAN.from_pretrained(tmp_path / "gan" / "model")
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(model.sample(4, generator=g()), again.sample(4, generator=g()))
    assert (tmp_path / "gan" / "report.html").is_file()


def test_dp_sgd_on_the_discriminator_trains_and_reports_epsilon(tmp_path, monkeypatch) -> None:
    # DP-GAN (Xie et al. 2018): DP-SGD wraps the discriminator, the only network that sees the members
    monkeypatch.chdir(REPO)
    audit = _fit(tmp_path, "dp_gan", 6, 32, "-c", "configs/defense/dp_sgd.yaml", "--data.num_members", "24",
                 "--data.num_heldout", "48", "--data.batch_size", "8", "--model.diffusion.init_args.width", "8",
                 "--model.diffusion.init_args.fake_batch", "8")
    assert audit["run"]["steps"] == 6
    assert 0 < audit["privacy"]["epsilon"] <= 10.0 + 1e-6 and audit["privacy"]["holds"] is not False
    assert audit["defense_metrics"]["defense/dp_sgd/steps"] == 6  # one DP step of the discriminator per batch
    # the export holds the plain discriminator (no wrapper's names) and reads back
    again = DCGAN.from_pretrained(tmp_path / "dp_gan" / "model")
    assert torch.isfinite(again.discriminator_score(torch.rand(2, 1, 16, 16))).all()


@pytest.mark.parametrize("extra, match", [
    ([], "fake_batch"),  # the number of fakes would follow the private Poisson batch's size
    (["--model.diffusion.init_args.fake_batch", "8", "--model.diffusion.init_args.d_steps", "2"], "d_steps"),
    (["--model.diffusion.init_args.fake_batch", "8", "-c", "configs/data/captioned_digits.yaml", "-c",
      "configs/defense/caption_randomization.yaml"], "change the training batch"),  # the model keeps its loss
])
def test_a_private_gan_refuses_what_its_accountant_would_not_cover(tmp_path, monkeypatch, extra, match) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=match):
        run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/model/gan.yaml",
                     "-c", "configs/defense/dp_sgd.yaml", "--audit", "null", "--trainer.enable_progress_bar", "false",
                     "--trainer.max_steps", "2", "--data.num_members", "24", "--data.num_heldout", "16",
                     "--run_dir", str(tmp_path / "dp"), *extra])


def _logan_auc(model: DCGAN, members: torch.Tensor, heldout: torch.Tensor) -> float:
    with torch.no_grad():
        scores = torch.cat([model.discriminator_score(members), model.discriminator_score(heldout)]).double().numpy()
    return mia_stats.auc(scores, np.arange(len(scores)) < len(members))


def test_logan_separates_the_members_of_a_discriminator_trained_long_on_few_images() -> None:
    images = load_builtin("digits", 16, 1).unit()
    members, heldout = images[:16], images[100:116]
    torch.manual_seed(0)
    model = DCGAN(width=32)
    assert 0.25 <= _logan_auc(model, members, heldout) <= 0.75  # untrained: chance (16 pairs: wide)
    optimizers = model.configure_optimizers()
    for _ in range(600):
        model.training_step(Batch(members, None, torch.arange(16)), optimizers, lambda loss: loss.backward())
    assert _logan_auc(model.eval(), members, heldout) > 0.8


@pytest.mark.slow
def test_a_gan_trained_long_on_few_images_copies_its_planted_duplicates(tmp_path, monkeypatch) -> None:
    # 8 members, 2 of them 10x: a small DCGAN at a high learning rate collapses onto the duplicated digits within a few
    # hundred steps (at DCGAN's 2e-4 and 400 steps it copied nothing: the samples stayed ~0.1 l2 from every member).
    # No checkpoints: with 26 rows an epoch is one step, and a checkpoint per epoch would double the time.
    monkeypatch.chdir(REPO)
    audit = _fit(tmp_path, "memorizing", 600, 128, "--data.num_members", "8", "--data.duplicate_images", "2",
                 "--data.duplicate_copies", "10", "--data.batch_size", "32", "--data.num_heldout", "200",
                 "--model.diffusion.init_args.width", "16", "--model.diffusion.init_args.latent_dim", "8",
                 "--model.diffusion.init_args.lr", "0.002", "--model.ema_decay", "0.99",
                 "--trainer.enable_checkpointing", "false")
    extraction = audit["extraction"]
    assert extraction["by_copies"]["10"]["num_extracted"] == 2  # both planted duplicates copied
    control = extraction["union"]["control"]
    assert control["above_chance"] and extraction["union"]["extracted"] > control["interval"][1]
    # the copies are closer to their members than any sample comes to a held-out image in the members' place
    planted = set(json.loads((tmp_path / "memorizing" / "manifest.json").read_text())["planted_duplicates"])
    assert planted <= set(extraction["union"]["beyond_control_ids"])
