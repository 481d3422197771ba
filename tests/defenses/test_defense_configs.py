"""A shrunk run of every shipped defense config (including dedup + DP-SGD) trains on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from privdiff.cli import run_fit_cli

REPO = Path(__file__).resolve().parents[2]
DEFENSE_CONFIGS = sorted((REPO / "configs" / "defense").glob("*.yaml"))
# Defense configs for text-to-image models, with what they need of the model.
TEXT_TO_IMAGE = {
    "caption_randomization": [],
    "prompt_mitigation": [],  # refused on a pixel model before training (Defense.check_model)
    "dp_lora": ["--model.diffusion.init_args.lora_rank", "2", "--model.diffusion.init_args.train_text_encoder", "false"],
}


@pytest.mark.parametrize("path", DEFENSE_CONFIGS, ids=lambda p: p.stem)
def test_defense_config_trains_shrunk(path: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    data = ["-c", "configs/data/digits.yaml"]
    if path.stem in TEXT_TO_IMAGE:  # captioned data and the tiny latent text-to-image model
        data = ["-c", "configs/data/captioned_digits.yaml", "-c", "configs/model/t2i_tiny.yaml", *TEXT_TO_IMAGE[path.stem],
                "--model.diffusion.init_args.vae_steps", "5", "--model.diffusion.init_args.block_out_channels", "[8, 16]"]
    cli = run_fit_cli([
        "fit", "-c", "configs/base.yaml", *data, "-c", str(path.relative_to(REPO)),
        "--run_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
        "--data.num_members", "24", "--data.num_heldout", "8", "--data.batch_size", "16", "--audit", "null",
    ])
    assert cli.trainer.global_step >= 1
    assert (tmp_path / "model" / "model_index.json").is_file()
    names = {d.name for d in cli.model.defenses}
    assert names and names == {d.name for d in cli.datamodule.defenses}
