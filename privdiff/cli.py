"""The ``privdiff`` command: ``fit`` (LightningCLI), ``audit`` and ``compare`` (jsonargparse's ``auto_cli``).

The one place that puts the stages together: the data module and the model of ``privdiff.train``,
their shared defenses, and the audit of ``privdiff.eval`` as a callback.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, auto_cli
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from privdiff.eval.audit import AuditCallback, AuditConfig
from privdiff.eval.periodic import PeriodicAudit, PeriodicAuditConfig
from privdiff.train.callbacks import FinalCheckpoint, StepProgressBar, TidyResume
from privdiff.train.checkpoint_io import SafeCheckpointIO
from privdiff.train.data import DiffusionDataModule
from privdiff.train.loggers import LoggingOptions, build_loggers
from privdiff.train.module import DiffusionModule


class PrivdiffCLI(LightningCLI):
    """LightningCLI with a run directory, privdiff's loggers and defenses shared by data and model."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `privdiff fit` only: validate/test/predict have nothing to do for a diffusion model here,
        # and the top-level usage lists fit, audit and compare.
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default", help="Directory of this run (config, manifest, checkpoints, model, audit).")
        parser.add_argument("--logging", type=LoggingOptions, default=LoggingOptions())
        parser.add_argument("--audit", type=Optional[AuditConfig], default=AuditConfig(), help="Audit run after fit (null: none).")
        parser.add_argument("--periodic_audit", type=Optional[PeriodicAuditConfig], default=None,
                            help="A light audit every N training steps, its trajectory and the checkpoint to ship (null: none).")
        parser.link_arguments("run_dir", "trainer.default_root_dir")
        parser.link_arguments("run_dir", "data.run_dir")  # one option for the run directory: --run_dir
        parser.link_arguments("data.image_size", "model.diffusion.init_args.image_size")
        parser.link_arguments("data.channels", "model.diffusion.init_args.channels")
        # One set of defense instances for data and model: one accountant, one dedup record.
        parser.link_arguments("data.defenses", "model.defenses", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        config = self.config.get(str(self.subcommand), self.config)
        logging = self._get(self.config_init, "logging")
        kwargs["logger"] = build_loggers(config["run_dir"], logging)
        # Checkpoints are written atomically and loaded weights-only, unless the user brings a CheckpointIO.
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        kwargs["plugins"] = plugins
        trainer_config = self._get(self.config_init, "trainer", default={})
        configured = trainer_config.get("callbacks") or []
        callbacks = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        if trainer_config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        # Among the trainer's callbacks, which Lightning runs before its checkpoint callbacks: a checkpoint then
        # holds the periodic audit of its own step.
        periodic = self._get(self.config_init, "periodic_audit")
        callbacks += [PeriodicAudit(periodic)] if periodic is not None else []
        kwargs["callbacks"] = [*callbacks, TidyResume(), FinalCheckpoint()]
        trainer = super().instantiate_trainer(**kwargs)
        audit = self._get(self.config_init, "audit")
        if audit is not None:
            trainer.callbacks.append(AuditCallback(audit, log_training_images=logging.log_training_images))
        return trainer


    def after_fit(self) -> None:
        # Lightning leaves the wandb run open (for notebooks); a finished fit closes it so that a
        # next run in the same process gets its own run and directory.
        if any(type(logger).__name__ == "WandbLogger" for logger in self.trainer.loggers):
            import wandb

            if wandb.run is not None:
                wandb.finish()


def run_fit_cli(args: list[str] | None = None) -> PrivdiffCLI:
    """Run LightningCLI on ``args`` (``fit --config ...``) and return it."""
    return PrivdiffCLI(
        DiffusionModule,
        DiffusionDataModule,
        args=args,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def module_from_config(path: str | Path, image_size: int = 16, channels: int = 1, *overrides: str) -> DiffusionModule:
    """The ``DiffusionModule`` a ``configs/model/*.yaml`` file describes, built as ``privdiff fit`` builds it
    (for benchmarks and notebooks: the same class_path, init_args and defaults); ``overrides`` are further
    command-line options, e.g. ``"--model.diffusion.init_args.lora_rank=8"``."""
    parser = ArgumentParser(default_env=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_class_arguments(DiffusionModule, "model")
    cfg = parser.parse_args(["-c", str(path), f"--model.diffusion.init_args.image_size={image_size}",
                             f"--model.diffusion.init_args.channels={channels}", *overrides])
    return parser.instantiate_classes(cfg).model


def run_function(fn: Callable[..., Any], argv: Sequence[str], prog: str) -> Any:
    """Parse ``argv`` for ``fn``'s typed signature with jsonargparse's ``auto_cli`` (configs, defenses and
    plugins instantiated from ``class_path``) and call it. ``-c`` is LightningCLI's spelling of ``--config``."""
    argv = ["--config" if a == "-c" else a for a in argv]
    return auto_cli(fn, args=argv, as_positional=False, prog=prog, default_env=False)


COMMANDS = ("fit", "audit", "compare")
USAGE = """usage: privdiff {fit,audit,compare} ...

  privdiff fit -c configs/base.yaml -c configs/data/digits.yaml   train (+ audit) one setting
  privdiff audit --run runs/NAME                                   audit a finished run again
  privdiff compare -c configs/compare/quickstart.yaml              train and audit a grid, one report

Run `privdiff fit --help`, `privdiff audit --help` or `privdiff compare --help` for the options."""

# What bad input raises (validation says what is wrong and how to fix it): printed as one line, no traceback.
INPUT_ERRORS = (ValueError, OSError, pickle.UnpicklingError)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``privdiff`` console script and of ``python -m privdiff``."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command = argv[0]
    if command not in COMMANDS:
        print(f"privdiff: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if command == "audit":
            from privdiff.eval.audit import audit_saved

            run_function(audit_saved, argv[1:], "privdiff audit")
        elif command == "compare":
            from privdiff.compare import compare

            run_function(compare, argv[1:], "privdiff compare")
        else:
            run_fit_cli(None if from_shell else argv)
    except INPUT_ERRORS as err:
        print(f"privdiff {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as err:
        if command != "compare":
            raise
        print(f"privdiff compare: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
