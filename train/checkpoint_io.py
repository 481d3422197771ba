"""Checkpoints written atomically and read weights-only (a Lightning ``CheckpointIO`` plugin)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint atomically and loads it with ``torch.load(weights_only=True)``.

    Lightning's own save (``lightning.fabric.utilities.cloud_io._atomic_save``, 2.6) writes through an
    fsspec transaction whose temporary file is made in the system temp folder, then moved: when that
    folder is another filesystem than the run directory (``/tmp`` on tmpfs) the move is a copy *into*
    the checkpoint path, so a kill during it leaves a truncated ``last.ckpt``; nothing is fsynced.
    Here the bytes go to a hidden file next to the target (``.NAME.PID.tmp``, which Lightning's
    ``ckpt_path="last"`` never picks), are fsynced, and replace the target with ``os.replace``: a kill
    at any moment leaves either the previous or the new checkpoint. Remote (fsspec) paths use
    Lightning's save.

    Loading restricts unpickling to tensors and plain Python types unless the caller asks otherwise
    (``privdiff fit --weights_only false``, for a checkpoint you trust), so a checkpoint from an
    untrusted path cannot run code, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        weights_only = True if weights_only is None else weights_only
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            if not weights_only:
                raise
            detail = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line), str(err))
            raise pickle.UnpicklingError(
                f"refused to load checkpoint {path}: it holds objects other than tensors and plain Python "
                f"types, and privdiff loads checkpoints weights-only ({detail}). Use a checkpoint written by "
                "privdiff; only for a file you trust, pass --weights_only false"
            ) from err
