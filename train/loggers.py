"""Loggers for a run: CSV always; wandb (offline by default) and TensorBoard when asked for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from privdiff.files import atomic_path


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


class _KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])  # appended rows keep its columns


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows of earlier runs in the same directory (a resume appends).

    Lightning's CSV logger deletes ``metrics.csv`` when its folder is not empty, so a resumed run
    lost every row logged before the interruption. :meth:`drop_rows_after` removes the rows of
    steps that a resume redoes (``TidyResume`` calls it).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_rows_after(self, step: int) -> int:
        """Remove rows logged at a step after ``step``; return how many."""
        path = Path(self.experiment.metrics_file_path)
        if not path.is_file():
            return 0
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not r.get("step") or float(r["step"]) <= step]
        if len(kept) < len(rows):
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
        return len(rows) - len(kept)


def build_loggers(run_dir: str | Path, options: LoggingOptions, run_name: str | None = None) -> list[Logger]:
    """Return the loggers of a run writing into ``run_dir`` (CSV first: it is always there)."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=str(run_dir), name="", version="")]
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
