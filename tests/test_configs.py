"""Every shipped config loads and instantiates (LightningCLI configs with the base, compare and audit files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from privdiff.eval.audit import AuditConfig
from privdiff.eval.periodic import PeriodicAuditConfig, SelectionRule
from privdiff.cli import PrivdiffCLI
from privdiff.train.data import DiffusionDataModule
from privdiff.train.module import DiffusionModule

REPO = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted(p for group in ("data", "model", "defense", "audit") for p in (REPO / "configs" / group).glob("*.yaml"))
COMPARE_CONFIGS = sorted((REPO / "configs" / "compare").glob("*.yaml"))


def test_every_config_folder_has_files() -> None:
    assert (REPO / "configs" / "base.yaml").is_file()
    for group in ("data", "model", "defense", "audit", "compare", "trainer"):
        assert list((REPO / "configs" / group).glob("*.yaml")), group


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fit_config_instantiates(path: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(REPO)
    cli = PrivdiffCLI(
        DiffusionModule,
        DiffusionDataModule,
        args=["-c", "configs/base.yaml", "-c", str(path.relative_to(REPO)), "--run_dir", str(tmp_path)],
        run=False,
        auto_configure_optimizers=False,
    )
    assert isinstance(cli.model, DiffusionModule) and isinstance(cli.datamodule, DiffusionDataModule)
    assert cli.model.defenses.defenses == cli.datamodule.defenses.defenses  # the same instances
    assert cli.trainer.default_root_dir == str(tmp_path)


TRAINER_CONFIGS = sorted((REPO / "configs" / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAINER_CONFIGS, ids=lambda p: f"trainer/{p.name}")
def test_trainer_config_instantiates_ddp_with_every_defense_config(path: Path, monkeypatch, tmp_path) -> None:
    """Scaling out changes only the trainer section; shrunk here to 2 CPU processes (nothing is launched)."""
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.chdir(REPO)
    shipped = yaml.safe_load(path.read_text())["trainer"]
    assert shipped["strategy"] == "ddp" and shipped["accelerator"] == "gpu"
    for defense in [None, *sorted((REPO / "configs" / "defense").glob("*.yaml"))]:
        extra = ["-c", str(defense.relative_to(REPO))] if defense else []
        cli = PrivdiffCLI(
            DiffusionModule,
            DiffusionDataModule,
            args=["-c", "configs/base.yaml", *extra, "-c", str(path.relative_to(REPO)), "--run_dir", str(tmp_path),
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
            run=False,
            auto_configure_optimizers=False,
        )
        assert isinstance(cli.trainer.strategy, DDPStrategy)
        assert cli.trainer.world_size == 2 * shipped["num_nodes"] and cli.trainer.num_nodes == shipped["num_nodes"]
        # DP-SGD draws its own Poisson batches: Lightning's distributed sampler must stay out.
        dp = cli.model.defenses.find("dp_sgd") is not None
        assert cli.config["trainer"]["use_distributed_sampler"] is (not dp), defense


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=lambda p: p.name)
def test_compare_config_parses_and_names_existing_files(path: Path, monkeypatch) -> None:
    from jsonargparse import auto_cli, capture_parser

    from privdiff.compare import compare

    monkeypatch.chdir(REPO)
    parser = capture_parser(lambda: auto_cli(compare, args=[], as_positional=False))
    cfg = parser.instantiate_classes(parser.parse_args(["--config", str(path)]))
    files = list(cfg.configs) + [c for s in cfg.settings.values() for c in s.configs]
    assert files and all((REPO / f).is_file() for f in files)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "audit").glob("*.yaml")), ids=lambda p: p.name)
def test_audit_configs_are_valid_audit_settings(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert set(doc) <= {"audit", "periodic_audit"} and doc, f"{path.name}: an audit file holds audit: and/or periodic_audit:"
    if "periodic_audit" in doc:  # the light profile run through training: its plugins must build as well
        periodic = dict(doc["periodic_audit"])
        profile = AuditConfig(**periodic.pop("profile", {}))
        if isinstance(periodic.get("selection"), dict):
            periodic["selection"] = SelectionRule(**periodic["selection"])
        assert [name for name, _ in profile.plugins()] and PeriodicAuditConfig(**periodic, profile=profile).every_n_steps >= 1
    if "audit" not in doc:
        return
    names = [name for name, _ in AuditConfig(**doc["audit"]).plugins()]
    core = ["quality", "extraction", "memorization", "mia"]
    assert [n for n in names if n in core] == core
    # the text-to-image audits add the caption attacks, the GAN's LOGAN; nothing else is listed
    expected = {"detection", "prompt_extraction"} if path.stem.startswith("t2i") else set()
    if path.stem == "gan":  # the GAN baseline's audit adds LOGAN's discriminator attack
        expected = {"gan_mia"}
    assert set(names) - set(core) - {"one_run", "canaries"} == expected  # the one-run audits: canaries, where a run has them


def test_unknown_config_key_is_refused(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  num_membrs: 10\n")
    with pytest.raises(SystemExit):
        PrivdiffCLI(DiffusionModule, DiffusionDataModule, args=["-c", "configs/base.yaml", "-c", str(bad)], run=False)


def _cli(tmp_path: Path, *files: str) -> PrivdiffCLI:
    args = ["-c", "configs/base.yaml", "-c", "configs/data/digits.yaml"]
    for f in files:
        args += ["-c", f]
    return PrivdiffCLI(DiffusionModule, DiffusionDataModule, args=[*args, "--run_dir", str(tmp_path)], run=False,
                       auto_configure_optimizers=False)


@pytest.mark.parametrize("order", [("dedup", "dp_sgd"), ("dp_sgd", "dedup")])
def test_stacked_defense_files_add_their_defenses_dedup_first(order, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(REPO)
    cli = _cli(tmp_path, *(f"configs/defense/{name}.yaml" for name in order))
    assert [d.name for d in cli.model.defenses] == ["dedup", "dp_sgd"]  # whatever the order of the files
    cli = _cli(tmp_path, "configs/defense/output_filter.yaml", "configs/defense/dp_sgd.yaml", "configs/defense/dedup.yaml")
    assert [d.name for d in cli.model.defenses] == ["dedup", "dp_sgd", "output_filter"]


def test_stacking_the_same_defense_twice_is_refused_by_name(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=r"once in a run.*\['dedup', 'dedup', 'dp_sgd'\].*keep one"):
        _cli(tmp_path, "configs/defense/dedup.yaml", "configs/defense/dedup_dp_sgd.yaml")
