"""The training callbacks of train/callbacks.py that a unit test reaches without a Trainer."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.callbacks import ModelCheckpoint

from privdiff.train.callbacks import FinalCheckpoint


def test_the_final_checkpoint_is_saved_as_the_checkpoint_callback_saves_its_own(tmp_path) -> None:
    """last.ckpt at the final step keeps the callback's save_weights_only (a full checkpoint to resume from by
    default), and says so to Lightning, which otherwise logs that weights_only was not set."""
    for weights_only in (False, True):
        saved = []
        callback = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=weights_only)
        trainer = SimpleNamespace(
            checkpoint_callbacks=[callback],
            save_checkpoint=lambda path, weights_only=None: saved.append((path, weights_only)),
        )
        FinalCheckpoint().on_train_end(trainer, None)
        assert saved == [(tmp_path / "last.ckpt", weights_only)]
        assert callback.last_model_path == str(tmp_path / "last.ckpt")
