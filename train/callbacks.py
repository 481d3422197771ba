"""Lightning callbacks of a privdiff run: one progress bar over all steps, and a tidy resume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from .loggers import ResumableCSVLogger


class StepProgressBar(TQDMProgressBar):
    """One bar over ``trainer.max_steps`` steps, with its total and ETA.

    Lightning's bar restarts every epoch; at the small data sets privdiff trains on (a DP epoch of
    64 rows at batch 64 is one step) it then shows "1/1" a thousand times and no ETA. With no
    ``max_steps`` it falls back to Lightning's bar per epoch.
    """

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        if trainer.max_steps and trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = 0
            self.train_progress_bar.n = trainer.global_step  # a resumed run starts where it left off
            self.train_progress_bar.set_description("training steps")
            self.train_progress_bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not (trainer.max_steps and trainer.max_steps > 0):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not (trainer.max_steps and trainer.max_steps > 0):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, trainer.max_steps):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


class FinalCheckpoint(pl.Callback):
    """Save ``last.ckpt`` at the final step when training ends.

    Lightning's ModelCheckpoint with ``every_n_train_steps`` saves ``last.ckpt`` at the last multiple of it: a run of
    160 steps saved every 50 left step 150 as "last", and ``--ckpt_path last`` after it trained steps 151-160
    again (released already by the export) without counting them. Here the last checkpoint is the final step.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                # every process calls it; the strategy writes once. weights_only as the callback's own saves
                # (Lightning logs a misleading "weights_only was not set" when it is left out)
                trainer.save_checkpoint(path, weights_only=callback.save_weights_only)
                callback.last_model_path = str(path)


_TEMP_CHECKPOINT = re.compile(r"^\..+\.(\d+)\.tmp$")  # SafeCheckpointIO's temporary files: .NAME.PID.tmp


class TidyResume(pl.Callback):
    """When a run resumes, clear what the interrupted process left that would mislead.

    - rows of ``metrics.csv`` logged after the resumed step (their steps are redone) are dropped;
      the rows before it are kept (Lightning's CSV logger deleted the whole file on a resume);
    - temporary checkpoint files of a save that was killed are deleted;
    - checkpoints of steps after the resumed one (the abandoned trajectory) are moved into
      ``checkpoints/abandoned/``, never deleted: they are the user's files, but a later save of
      the same step would otherwise be versioned beside them and ``ckpt_path=last`` stays
      unambiguous.
    """

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                dropped = logger.drop_rows_after(step)
                if dropped:
                    rank_zero_info(f"privdiff: resumed at step {step}: dropped {dropped} metrics.csv row(s) of the redone steps")
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                self._tidy_checkpoints(Path(callback.dirpath), Path(trainer.ckpt_path).resolve(), step)

    @staticmethod
    def _tidy_checkpoints(folder: Path, resumed_from: Path, step: int) -> None:
        if not folder.is_dir():
            return
        for temp in folder.iterdir():
            if _TEMP_CHECKPOINT.match(temp.name):
                temp.unlink(missing_ok=True)
        later = []
        for ckpt in sorted(folder.glob("*.ckpt")):
            if ckpt.resolve() == resumed_from or "last" in ckpt.stem:  # last.ckpt is overwritten at the next save
                continue
            try:
                saved_step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1)
            except Exception:  # noqa: BLE001 - an unreadable file is left where it is
                continue
            if saved_step > step:
                later.append(ckpt)
        if later:
            target = folder / "abandoned"
            target.mkdir(exist_ok=True)
            for ckpt in later:
                ckpt.replace(target / ckpt.name)
            rank_zero_info(
                f"privdiff: resumed at step {step}: moved {len(later)} checkpoint(s) of later steps of the interrupted "
                f"run to {target}"
            )
