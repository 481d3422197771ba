"""Safe loading, private outputs and determinism, through the real CLI on the built-in digits."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from privdiff.defenses.base import Guarantee
from privdiff.eval.audit import privacy_summary
from privdiff.eval.report import write_report
from privdiff.cli import run_fit_cli
from privdiff.train.denoiser import build_scheduler, build_unet
from privdiff.train.pixel import PixelDiffusion

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model.diffusion.block_out_channels", "[16, 32]", "--trainer.enable_progress_bar", "false",
         "--data.num_members", "16", "--data.num_heldout", "8", "--data.duplicate_images", "0", "--data.batch_size", "8"]


def fit(run_dir: Path, *extra: str, configs: tuple[str, ...] = ()):
    cfg = [a for c in ("configs/base.yaml", "configs/data/digits.yaml", *configs) for a in ("-c", str(REPO / c))]
    return run_fit_cli(["fit", *cfg, *SMALL, "--run_dir", str(run_dir), *extra])


class MakesAFile:
    """Unpickling this creates ``path``: a stand-in for code a malicious pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- 4. safe loading ---------------------------------------------------------------------------------
def test_a_checkpoint_holding_a_malicious_pickle_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # torch.load would unpickle anything when weights_only is not passed and this is set: privdiff must pass it.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, evil = tmp_path / "pwned", tmp_path / "run" / "checkpoints" / "last.ckpt"
    evil.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 1, "payload": MakesAFile(marker)}, evil)
    args = ["--trainer.max_steps", "2", "--audit", "null"]
    # A path: LightningCLI reads the file's hyper-parameters first, itself with weights_only=True.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        fit(tmp_path / "run", *args, "--ckpt_path", str(evil))
    # "last": the trainer loads it through privdiff's CheckpointIO.
    with pytest.raises(pickle.UnpicklingError, match="refused to load checkpoint .*last.ckpt.*io.open.*--weights_only false"):
        fit(tmp_path / "run", *args, "--ckpt_path", "last")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: loaded as a plain pickle, the payload runs
    assert marker.exists()


def test_our_checkpoints_load_weights_only_with_every_defense_and_a_conditional_model(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "all.yaml").write_text("""
data:
  defenses:
    - class_path: privdiff.defenses.dedup.DedupDefense
    - class_path: privdiff.defenses.dp_sgd.DPSGDDefense
      init_args: {noise_multiplier: 1.0, accountant: rdp}
    - class_path: privdiff.defenses.output_filter.OutputFilterDefense
""")
    args = ["-c", str(tmp_path / "all.yaml"), "--model.diffusion.num_classes", "10", "--audit", "null"]
    fit(tmp_path / "run", "--trainer.max_steps", "2", *args)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # EMA, defense state, LightningCLI's hyper-parameters: plain types
    assert ckpt["state_dict"]["diffusion.trainable.class_embedding.weight"].shape[0] == 10 and ckpt["defenses"]["dp_sgd"]["steps"] == 2
    assert set(ckpt["defenses"]) == {"dedup", "dp_sgd", "output_filter"} and ckpt["ema"]["optimization_step"] == 2
    resumed = fit(tmp_path / "run", "--trainer.max_steps", "3", *args, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 3


def test_an_export_holding_only_a_pickled_bin_is_refused(tmp_path) -> None:
    model = tmp_path / "model"
    PixelDiffusion.from_parts(build_unet(8, 1, (8, 16), attention_levels=()), build_scheduler(10)).save_pretrained(model)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": MakesAFile(marker)}, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights.*diffusion_pytorch_model.bin.*pickle"):
        PixelDiffusion.from_pretrained(model)
    assert not marker.exists()


# -- 5. private outputs -------------------------------------------------------------------------------
def test_default_run_keeps_training_images_in_the_run_directory(tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # A loose calibrated threshold makes the untrained model "extract" members: the cases exist (on local disk).
    fit(run, "--trainer.max_steps", "2", "--logging.tensorboard", "true", "--audit.num_samples", "8",
        "--audit.attacks", json.dumps({"extraction": {"class_path": "privdiff.eval.extraction.ExtractionAttack", "init_args": {"calibrated_threshold": 100}}}),
        "--audit.progress", "false")
    assert (run / "audit_cases.safetensors").is_file()
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "run"]
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        assert tags["images"] == [] and tags["audio"] == []
        assert any(t.startswith("audit/") for t in tags["scalars"])  # the audit's numbers did arrive
    csv_text = (run / "metrics.csv").read_text()
    assert "audit/extracted" in csv_text and "base64" not in csv_text and "\x89PNG" not in csv_text
    # The report sits in the run directory and says that it shows training images.
    html = (run / "report.html").read_text()
    assert "embeds images of training data" in html
    assert json.loads((run / "audit.json").read_text())["training_images_embedded"] is False


def _cases(run_dir: Path, n: int) -> None:
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({"samples": torch.rand(n, 1, 8, 8), "nearest": torch.rand(n, 1, 8, 8), "distance": torch.rand(n)},
              str(run_dir / "audit_cases.safetensors"))


def test_report_warns_exactly_when_it_embeds_training_images_and_names_the_accountant(tmp_path) -> None:
    guarantee = Guarantee(epsilon=3.2, delta=1e-5, accountant="prv", privacy_unit="one training row", steps=40, budget=4.0, defense="dp_sgd")
    audit = {"privacy": privacy_summary([guarantee]), "run": {"defenses": "dp_sgd(sigma=1)"}}
    with_cases, without = tmp_path / "with", tmp_path / "without"
    _cases(with_cases, 3)
    _cases(without, 0)
    for out, run_dir, embed, expected in [("a", with_cases, True, True), ("b", with_cases, False, False), ("c", without, True, False)]:
        paths = write_report(tmp_path / out, {"x": audit}, {"x": run_dir}, embed_training_images=embed)
        html = paths["html"].read_text()
        assert ("This report embeds images of training data" in html) is expected, out
        assert ("No image of training data is embedded" in html) is not expected, out
        assert html.count("data:image/png;base64,") == expected  # (no attack ran: no other figure)
        assert json.loads(paths["json"].read_text())["training_images_embedded"] is expected
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "3.20 (1e-05, prv)" in markdown
    assert "dp_sgd spent ε=3.2 at δ=1e-05 (prv accountant, 40 steps) of a budget of ε=4" in markdown


# -- 6. determinism -----------------------------------------------------------------------------------
# Two CPU runs with the same seed must agree to this absolute tolerance on every audit number (they
# agree exactly on this machine; the tolerance leaves room for other BLAS builds). Counts must be equal.
TOLERANCE = 1e-6


def _numbers(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            # not audit numbers: timings, and whether the FID classifier came from its cache (the first run trains it)
            if k not in ("timings_s", "run", "cached"):
                yield from _numbers(v, f"{prefix}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


@pytest.mark.slow
def test_same_seed_gives_the_same_split_dedup_result_and_audit_numbers(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        fit(run, "--trainer.max_steps", "4", "--data.duplicate_images", "2", "--data.duplicate_copies", "3",
            "--audit.num_samples", "16", "--audit.attacks.mia.examples", "8", "--audit.attacks.mia.secmi_k", "2",
            configs=("configs/defense/dedup.yaml", "configs/audit/fast.yaml"))
    manifests = [json.loads((r / "manifest.json").read_text()) for r in runs]
    assert manifests[0] == manifests[1] and len(manifests[0]["removed"]) == 4
    audits = [dict(_numbers(json.loads((r / "audit.json").read_text()))) for r in runs]
    assert audits[0].keys() == audits[1].keys()
    assert {"/mia/loss/auc", "/mia/pia/auc", "/mia/secmi/auc", "/quality/fid"} <= audits[0].keys()
    for key, a in audits[0].items():
        b = audits[1][key]
        if isinstance(a, float) and not isinstance(b, bool):
            assert math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE) or (math.isnan(a) and math.isnan(b)), key
        else:
            assert a == b, key
    # The same seed is what makes them agree: another seed gives another split.
    other = fit(tmp_path / "c", "--trainer.max_steps", "1", "--data.seed", "1", "--audit", "null")
    assert other.datamodule.manifest.members != manifests[0]["members"]
