"""The ``privdiff`` command as a new user meets it: usage, errors before training, help texts, re-audits of a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from privdiff.eval.audit import audit_saved
from privdiff.cli import COMMANDS, USAGE, PrivdiffCLI, main, run_fit_cli

REPO = Path(__file__).resolve().parents[1]
SHRUNK = ["--trainer.enable_progress_bar", "false", "--model.diffusion.block_out_channels", "[8, 16]",
          "--data.num_members", "24", "--data.num_heldout", "16", "--data.batch_size", "8"]
FAST_AUDIT = ["--audit.num_samples", "16", "--audit.steps", "2", "--audit.attacks.mia.examples", "8",
              "--audit.attacks.mia.loss_timesteps", "[50]", "--audit.attacks.mia.secmi_k", "2", "--audit.progress", "false"]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return int(stop.value.code), capsys.readouterr().err


def test_the_usage_lists_exactly_the_commands_there_are(capsys) -> None:
    assert set(COMMANDS) == {"fit", "audit", "compare"} and set(PrivdiffCLI.subcommands()) == {"fit"}
    assert USAGE.startswith("usage: privdiff {fit,audit,compare}")
    code, err = run_main(["validate"], capsys)
    assert code == 2 and "unknown command 'validate'" in err and "{fit,audit,compare}" in err


def test_audit_without_arguments_or_with_a_missing_run_is_one_clear_line(tmp_path, capsys) -> None:
    code, err = run_main(["audit"], capsys)
    assert code == 2 and "give exactly one of --run DIR or --model DIR" in err and "Traceback" not in err
    code, err = run_main(["audit", "--run", str(tmp_path / "nope")], capsys)
    assert code == 2 and f"run directory {tmp_path / 'nope'} does not exist" in err and "diffusers" not in err
    (tmp_path / "half").mkdir()
    code, err = run_main(["audit", "--run", str(tmp_path / "half")], capsys)
    assert code == 2 and "holds no model/ folder" in err and "--ckpt_path last" in err


def test_audit_options_have_help_texts() -> None:
    done = subprocess.run([sys.executable, "-m", "privdiff", "audit", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0
    help_text = " ".join(done.stdout.split())
    for option, words in (("--run RUN", "a run directory"), ("--model MODEL", "a diffusers model folder"),
                          ("--manifest MANIFEST", "the manifest.json"), ("--out OUT", "where audit.json")):
        assert f"{option} {words}" in help_text, option


def test_a_missing_data_path_fails_before_training_and_leaves_no_run_folder(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    for source in ("folder", "hf"):
        code, err = run_main(["fit", "-c", "configs/base.yaml", "--data.source", source, "--data.path", "/nonexistent",
                              "--run_dir", str(run)], capsys)
        assert code == 2 and "/nonexistent" in err and "does not exist" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 2, err
        assert not run.exists()


def test_the_run_directory_has_one_option(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):  # jsonargparse: unrecognized argument
        run_fit_cli(["fit", "-c", "configs/base.yaml", "--data.run_dir", str(tmp_path)])


def test_the_progress_bar_counts_steps_not_epochs(tmp_path, monkeypatch) -> None:
    from privdiff.train.callbacks import StepProgressBar

    monkeypatch.chdir(REPO)
    cli = run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", *SHRUNK, "--trainer.enable_progress_bar", "true",
                       "--trainer.max_steps", "5", "--audit", "null", "--run_dir", str(tmp_path)])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert bar.train_progress_bar.total == 5 and bar.train_progress_bar.n == 5  # 5 steps over 3+ epochs of 2 batches


# -- a DP run audited again ----------------------------------------------------------------------------
@pytest.mark.slow
def test_auditing_a_dp_run_again_keeps_its_defenses_and_epsilon_and_its_audit(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    run = tmp_path / "dp"
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/defense/dp_sgd.yaml",
                 "-c", "configs/audit/fast.yaml", *SHRUNK, *FAST_AUDIT, "--trainer.max_steps", "3", "--run_dir", str(run)])
    first_text = (run / "audit.json").read_text()
    first = json.loads(first_text)
    assert 0 < first["privacy"]["epsilon"] <= 10 and first["privacy"]["holds"] is True
    again = audit_saved(run=str(run), audit=None)
    assert (run / "audit.json").read_text() == first_text  # the run's own audit is never overwritten
    (out,) = (run / "audits").iterdir()
    assert json.loads((out / "audit.json").read_text())["privacy"] == again["privacy"]
    assert again["run"]["defenses"] == first["run"]["defenses"] == "dp_sgd(eps<=10, delta=1e-05)"
    assert again["privacy"]["epsilon"] == first["privacy"]["epsilon"]
    assert "dp_sgd spent ε=" in (out / "report.md").read_text()
    # Without the training record (a model folder brought elsewhere) the guarantee is unknown, not "none".
    (run / "defenses.json").rename(tmp_path / "moved.json")
    with pytest.warns(UserWarning, match="reported as unknown"):
        unknown = audit_saved(run=str(run), out=str(tmp_path / "unknown"))
    assert unknown["privacy"]["known"] is False and unknown["run"]["defenses"] == "unknown"
    assert "| unknown | unknown |" in (tmp_path / "unknown" / "report.md").read_text()


@pytest.mark.slow
def test_a_fixed_debug_noise_seed_repeats_the_noise_and_the_report_says_epsilon_does_not_hold(tmp_path, monkeypatch) -> None:
    import torch

    monkeypatch.chdir(REPO)
    weights = []
    for name in ("a", "b"):
        run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/defense/dp_sgd.yaml",
                     "-c", "configs/audit/fast.yaml", *SHRUNK, *FAST_AUDIT, "--trainer.max_steps", "2",
                     "--data.defenses.init_args.debug_noise_seed", "7", "--run_dir", str(tmp_path / name)])
        weights.append(torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the noise is a function of the seed
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert audit["privacy"]["holds"] is False
    report = (tmp_path / "a" / "report.md").read_text()
    assert "— does NOT hold" in report and "fixed seed 7" in report


# -- fit end: the model is saved before the audit runs ----------------------------------------------
def test_a_failing_audit_leaves_the_exported_model_and_the_defense_record(tmp_path, monkeypatch) -> None:
    import privdiff.eval.audit as audit_module

    monkeypatch.chdir(REPO)

    def broken(*args, **kwargs):
        raise RuntimeError("the audit broke")

    monkeypatch.setattr(audit_module, "run_audit", broken)
    with pytest.raises(RuntimeError, match="the audit broke"):
        run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", *SHRUNK, "--trainer.max_steps", "2",
                     "--run_dir", str(tmp_path)])
    assert (tmp_path / "model" / "model_index.json").is_file() and (tmp_path / "defenses.json").is_file()


# -- every shipped data config, end to end with the default audit --------------------------------------
def _fake_cifar(path: Path) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(40)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})
    datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(40)]}, features=features).save_to_disk(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "data").glob("*.yaml")))
def test_every_shipped_data_config_trains_and_audits_with_the_default_audit(config, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    extra = ["--data.num_members", "24", "--data.num_heldout", "16"]
    if config == "cifar10.yaml":
        _fake_cifar(tmp_path / "cifar")
        extra = ["--data.path", str(tmp_path / "cifar"), "--data.num_members", "null", "--data.num_heldout", "16",
                 "--data.num_workers", "0"]
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", f"configs/data/{config}", "--trainer.enable_progress_bar", "false",
                 "--model.diffusion.block_out_channels", "[8, 16]", "--model.warmup_steps", "1", "--data.batch_size", "8", *extra,
                 *FAST_AUDIT, "--trainer.max_steps", "2", "--run_dir", str(tmp_path / "run")])
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert audit["quality"]["fid"] >= 0 and audit["mia"]["best"]["auc"] >= 0
    if config == "faces.yaml":  # unlabeled: the FID features learn k-means clusters, and say so
        assert audit["quality"]["backbone"].startswith("small-classifier-64d-kmeans")


# -- natural duplicates: exact copies among the user's files -----------------------------------------
@pytest.mark.slow
def test_dedup_merging_members_of_a_folder_with_copies_then_the_audit_runs(tmp_path, monkeypatch) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    monkeypatch.chdir(REPO)
    digits = (load_digits().images[:60] / 16 * 255).astype(np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(digits):
        Image.fromarray(image).save(folder / f"d{i:03d}.png")
    for i in range(6):  # the same picture under another name, as in real photo folders
        Image.fromarray(digits[i]).save(folder / f"copy{i}.png")
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/defense/dedup.yaml", "--data.source", "folder",
                 "--data.path", str(folder), "--data.image_size", "8", "--data.num_members", "44", "--data.num_heldout", "16",
                 "--data.batch_size", "8", *FAST_AUDIT, "--trainer.enable_progress_bar", "false", "--model.diffusion.block_out_channels", "[8, 16]",
                 "--trainer.max_steps", "2", "--run_dir", str(tmp_path / "run")])
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    removed = len(manifest["removed"])
    assert removed >= 1 and audit["data"]["removed_by_defenses"] == removed
    # A member merged into its twin is one image with it (its group): no member is left with 0 training rows.
    assert "0" not in audit["extraction"]["by_copies"]
    assert audit["data"]["num_member_groups"] == audit["data"]["num_members"] - removed


@pytest.mark.slow
def test_the_readme_command_with_no_audit_file_flags_at_most_the_asked_share_of_held_out_images(tmp_path, monkeypatch) -> None:
    """README's first command, shrunk only in training steps and samples: the thresholds come from the
    data's held-out images, whatever the model, and flag no more than 1% of the other held-out images."""
    from privdiff.eval.thresholds import _interval

    monkeypatch.chdir(REPO)
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/defense/dp_sgd.yaml",
                 "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--model.diffusion.block_out_channels", "[8, 16]",
                 "--audit.num_samples", "16", "--audit.steps", "2", "--audit.attacks.mia.examples", "16", "--audit.progress", "false",
                 "--run_dir", str(tmp_path)])
    audit = json.loads((tmp_path / "audit.json").read_text())
    check = audit["threshold_check"]
    assert not check["too_loose"] and check["num_heldout"] == 200 and audit["data"]["num_calibration"] == 200
    for criterion, rate in check["heldout_flag_rate"].items():
        assert _interval(round(rate * 200), 200)[0] <= 0.01, (criterion, rate)
    thresholds = {**audit["extraction"]["thresholds"], **audit["memorization"]["thresholds"]}
    assert all(t["source"] == "calibrated" and t["resolved"] for t in thresholds.values())
    assert all(t["published_rate"] > 0.3 for k, t in thresholds.items() if k != "threshold")  # the paper's l2 values would not do
