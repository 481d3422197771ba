"""Loggers for a run: CSV always; wandb (offline by default) and TensorBoard when asked for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger


@dataclass
class LoggingOptions:
    """Where a run's metrics go.

    Args:
        wandb: also log to Weights & Biases.
        wandb_mode: ``offline`` (default: nothing leaves the machine; ``wandb sync`` later) or ``online``.
        wandb_project, wandb_group: where the run appears in wandb; a compare sets the group.
        tensorboard: also write TensorBoard event files into the run directory.
        log_training_images: allow images that show training data (extracted pairs, nearest
            neighbours) to be sent to remote dashboards. Off by default: they stay on local disk.
    """

    wandb: bool = False
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "privdiff"
    wandb_group: str | None = None
    tensorboard: bool = False
    log_training_images: bool = False


def build_loggers(run_dir: str | Path, options: LoggingOptions, run_name: str | None = None) -> list[Logger]:
    """Return the loggers of a run writing into ``run_dir`` (CSV first: it is always there)."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if options.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    if options.wandb:
        from lightning.pytorch.loggers import WandbLogger

        offline = options.wandb_mode == "offline"
        if offline:
            os.environ["WANDB_MODE"] = "offline"  # the wandb library's own switch
        loggers.append(
            WandbLogger(
                name=run_name or run_dir.name,
                save_dir=str(run_dir),
                project=options.wandb_project,
                group=options.wandb_group,
                offline=offline,
                id=_stable_wandb_id(run_dir),
                resume="allow",
            )
        )
    return loggers


def _stable_wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so that a resumed run continues the same dashboard entry."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
