"""The architecture's seams: a saved model fine-tuned through the YAML, an attack added by config alone,
a guarantee from any defense in the ε column, and the import layering of the packages."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest
import torch

from privdiff.cli import run_fit_cli
from privdiff.defenses.base import Defense, Guarantee
from privdiff.eval.audit import AuditConfig, AuditData, run_audit
from privdiff.eval.extraction import ExtractionAttack
from privdiff.eval.report import write_report
from privdiff.train.data import load_builtin
from privdiff.train.pixel import PixelDiffusion

REPO = Path(__file__).resolve().parents[1]
SHRUNK = ["--trainer.enable_progress_bar", "false", "--model.diffusion.block_out_channels", "[8, 16]",
          "--data.num_members", "24", "--data.num_heldout", "16", "--data.batch_size", "8"]


# -- a saved diffusers folder, fine-tuned under DP-SGD through the YAML --------------------------------
@pytest.mark.slow
def test_a_saved_pixel_model_is_fine_tuned_under_dp_sgd_from_its_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", *SHRUNK, "--trainer.max_steps", "5",
                 "--audit", "null", "--run_dir", str(tmp_path / "first")])
    saved = PixelDiffusion.from_pretrained(tmp_path / "first" / "model")
    (tmp_path / "finetune.yaml").write_text(textwrap.dedent(f"""
        model:
          diffusion:
            class_path: privdiff.train.pixel.PixelDiffusion
            init_args:
              pretrained: {tmp_path / "first" / "model"}
    """))
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/defense/dp_sgd.yaml",
            "-c", str(tmp_path / "finetune.yaml"), *SHRUNK, "--trainer.max_steps", "3", "--audit", "null",
            "--data.defenses.init_args.target_epsilon", "null", "--data.defenses.init_args.noise_multiplier", "1.0",
            "--run_dir", str(tmp_path / "second")]
    from privdiff.cli import PrivdiffCLI
    from privdiff.train.data import DiffusionDataModule
    from privdiff.train.module import DiffusionModule

    built = PrivdiffCLI(DiffusionModule, DiffusionDataModule, args=args[1:], run=False, auto_configure_optimizers=False)
    for (name, p), q in zip(built.model.diffusion.trainable.named_parameters(), saved.trainable.parameters()):
        assert torch.equal(p, q), name  # it starts from the saved weights, not from random ones
    cli = run_fit_cli(args)
    dp = [d for d in cli.model.defenses if d.guarantee() is not None]
    assert len(dp) == 1 and dp[0].steps == 3 and dp[0].epsilon() > 0
    tuned = PixelDiffusion.from_pretrained(tmp_path / "second" / "model")
    assert any(not torch.equal(p, q) for p, q in zip(tuned.trainable.parameters(), saved.trainable.parameters()))


# -- an attack added through the audit config alone -------------------------------------------------
TOY_PLUGIN = '''
from dataclasses import dataclass

from privdiff.eval.plugin import AuditPlugin, AuditResult, Column


@dataclass
class MeanBrightness(AuditResult):
    value: float

    def to_dict(self):
        return {"mean": self.value}

    def columns(self):
        return [Column("brightness", "mean brightness", "mean pixel of the samples", self.value, f"{self.value:.3f}")]


class BrightnessMetric(AuditPlugin):
    """A toy metric: the mean pixel value of the samples."""

    name = "brightness"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def run(self, context):
        return MeanBrightness(float(context.samples.mean()) * self.scale)
'''


def test_a_toy_attack_added_by_config_alone_gets_its_column(tmp_path, monkeypatch) -> None:
    (tmp_path / "toy_attacks.py").write_text(TOY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(REPO)
    audit_file = tmp_path / "audit.yaml"
    audit_file.write_text(textwrap.dedent("""
        audit:
          num_samples: 8
          steps: 2
          progress: false
          attacks:
            extraction: {class_path: privdiff.eval.extraction.ExtractionAttack}
            brightness:
              class_path: toy_attacks.BrightnessMetric
              init_args: {scale: 2.0}
    """))
    run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", str(audit_file), *SHRUNK,
                 "--trainer.max_steps", "2", "--run_dir", str(tmp_path / "run")])
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert 0 < audit["brightness"]["mean"] <= 2.0
    assert audit["config"]["attacks"]["brightness"] == {"class_path": "toy_attacks.BrightnessMetric", "init_args": {"scale": 2.0}}
    markdown = (tmp_path / "run" / "report.md").read_text()
    header = markdown.splitlines()[2]
    assert "| extracted · chance | mean brightness |" in header and f"{audit['brightness']['mean']:.3f}" in markdown


# -- any defense's guarantee reaches the ε column -----------------------------------------------------
class FakeDP(Defense):
    """A test-only second DP defense: it only reports a guarantee."""

    name = "fake_dp"

    def guarantee(self) -> Guarantee:
        return Guarantee(epsilon=2.5, delta=1e-6, accountant="fake-accountant", privacy_unit="one image")


class CopyNothing(PixelDiffusion):
    def sample(self, n, solver="ddim", steps=10, cond=None, generator=None):
        return torch.rand(n, *self.image_shape, generator=generator)


def test_a_second_dp_defense_puts_its_epsilon_into_the_report(tmp_path) -> None:
    pool = load_builtin("digits", 8, 1)
    data = AuditData(pool.select(range(20)), pool.select(range(20, 30)), torch.ones(20, dtype=torch.long))
    config = AuditConfig(num_samples=8, progress=False, attacks={"extraction": ExtractionAttack()})
    model = CopyNothing(8, 1, block_out_channels=(8, 16), attention_levels=())
    result = run_audit(model, data, config, defenses=[FakeDP()])
    assert result["privacy"]["epsilon"] == 2.5 and result["privacy"]["accountant"] == "fake-accountant"
    paths = write_report(tmp_path, {"fake": result}, {"fake": tmp_path})
    markdown = paths["md"].read_text()
    assert "| fake | fake_dp | 2.50 (1e-06, fake-accountant) |" in markdown
    assert "fake_dp spent ε=2.5 at δ=1e-06 (fake-accountant accountant)" in markdown


# -- import layering ----------------------------------------------------------------------------------
LAYERS = {"core": 0, "defenses": 1, "train": 2, "eval": 3, "cli": 4}
FOLDERS = {"defenses": "defenses", "train": "train", "eval": "eval", "privdiff": "core"}
ENTRY_POINTS = {"privdiff.cli", "privdiff.compare", "privdiff.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, _ in FOLDERS.items():
        for path in (REPO / folder).glob("*.py"):
            package = "privdiff" if folder == "privdiff" else f"privdiff.{folder}"
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "core"


def _imports(module: str, path: Path) -> set[str]:
    """privdiff modules ``module`` imports (absolute and relative, at any depth in the file, TYPE_CHECKING too)."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("privdiff")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("privdiff"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in _modules() else base for a in node.names}
    return found


def test_no_package_imports_one_that_imports_it_back() -> None:
    """core (privdiff's model, membership, distances, weights) <- defenses <- train <- eval <- cli (privdiff.cli, compare)."""
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for target in _imports(module, path):
            if target in modules and LAYERS[_layer(target)] > LAYERS[_layer(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, upward
    # and no cycle among modules either
    graph = {m: {t for t in _imports(m, p) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            assert state.get(t) != 1, " -> ".join(trail + [m, t])
            if t not in state:
                visit(t, trail + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_stage_outside_defenses_names_a_defense() -> None:
    names = {"dp_sgd", "dedup", "output_filter"}
    for folder in ("train", "eval", "privdiff"):
        for path in (REPO / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            assert not literals & names, f"{path.relative_to(REPO)} names {literals & names}"
