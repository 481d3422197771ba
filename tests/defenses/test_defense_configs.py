"""A shrunk run of every shipped defense config (including dedup + DP-SGD) trains on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from privdiff.cli import run_fit_cli

REPO = Path(__file__).resolve().parents[2]
DEFENSE_CONFIGS = sorted((REPO / "configs" / "defense").glob("*.yaml"))


@pytest.mark.parametrize("path", DEFENSE_CONFIGS, ids=lambda p: p.stem)
def test_defense_config_trains_shrunk(path: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    cli = run_fit_cli([
        "fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", str(path.relative_to(REPO)),
        "--run_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
        "--data.num_members", "24", "--data.num_heldout", "8", "--data.batch_size", "16", "--audit", "null",
    ])
    assert cli.trainer.global_step >= 1
    assert (tmp_path / "model" / "model_index.json").is_file()
    names = {d.name for d in cli.model.defenses}
    assert names and names == {d.name for d in cli.datamodule.defenses}
