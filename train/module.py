"""The LightningModule that trains any ``privdiff.model.GenerativeModel`` with defenses and EMA weights.

One module for every kind of model. A diffusion model trains through this module's loss and optimizer
(automatic optimization); a model that ``owns_training`` (a GAN: a generator and a discriminator, two
optimizers) gives its own optimizers and training step, and this module runs them with Lightning's manual
optimization, keeping the EMA, checkpoints, the export and the audit hooks it gives every model.

Why a model-side hook rather than a second LightningModule chosen by LightningCLI's
``subclass_mode_model=True``: every shipped config's ``model:`` block holds this module's init args without
a ``class_path``, and subclass mode rejects them ("Does not validate against any of the Union subtypes");
with a default ``class_path`` they parse, but the CLI's links (``data.image_size`` ->
``model.diffusion.init_args.image_size``), ``--model.diffusion...`` overrides, ``module_from_config`` and
every ``cli.model.diffusion`` would change paths or meaning. The hook keeps every config and command
unchanged: a GAN is one more ``model.diffusion.class_path``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from diffusers.training_utils import EMAModel
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info

from privdiff.files import write_json_atomic
from privdiff.model import Batch, GenerativeModel

from ..defenses.base import DEFENSES_RECORD, Defense, DefenseStack, as_stack
from .denoiser import unwrap
from .pixel import PixelDiffusion

RELEASED_LEDGER = "released.json"
WRAPPED = "._module."  # how Opacus's GradSampleModule (a defense's wrapper) names the module it wraps


class DiffusionModule(pl.LightningModule):
    """Trains a diffusion model with the simple epsilon loss (Ho et al. 2020), defenses and EMA weights.

    Args:
        diffusion: the model (``class_path`` + ``init_args`` in YAML; default a pixel UNet,
            ``privdiff.train.pixel.PixelDiffusion``; a GAN: ``privdiff.train.gan.DCGAN``). Its
            ``image_size``/``channels`` are linked from the data module.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up, over the model's trainable parameters
            (ignored by a model that ``owns_training``: its own init args set its optimizers).
        ema_decay: maximum decay of the EMA weights (diffusers ``EMAModel`` with warm-up); the
            audit and the export use the EMA weights.
        defenses: training-stage defenses (the same instances as the data module's).
        export_dir: where to write the diffusers folder at the end of fit (default <run>/model).
    """

    def __init__(
        self,
        diffusion: GenerativeModel = lazy_instance(PixelDiffusion),
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        ema_decay: float = 0.999,
        defenses: list[Defense] | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0 or warmup_steps < 0 or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"need lr > 0, warmup_steps >= 0 and 0 <= ema_decay < 1, got {lr}, {warmup_steps}, {ema_decay}")
        self.save_hyperparameters(ignore=["defenses", "diffusion"])
        self.diffusion = diffusion
        self.defenses: DefenseStack = as_stack(defenses)
        # foreach: one kernel over all parameters instead of one per tensor (half the time of a small model's step)
        self.ema = EMAModel(diffusion.trainable_parameters(), decay=ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
        # A model with several optimizers (a GAN) steps them itself: Lightning's manual optimization.
        self.automatic_optimization = not diffusion.owns_training
        self._private_optimizer: int | None = None  # which of a self-training model's optimizers a defense wrapped


    # -- training ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any] | list[torch.optim.Optimizer]:
        if self.diffusion.owns_training:
            return self._own_optimizers()
        self.defenses.check_trainer(self.trainer)
        self.defenses.check_model(self.diffusion)
        self.diffusion.trainable = self.defenses.wrap_model(self.diffusion.trainable)
        params = list(self.diffusion.trainable_parameters())
        # The fused kernel updates every parameter in one pass: 5x faster than the per-tensor loop torch
        # uses on CPU for a small model's few hundred tensors (the same update up to rounding).
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused or None)
        optimizer = self.defenses.wrap_optimizer(optimizer, self.diffusion.trainable)
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _own_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of a model that trains itself, the one over its private module wrapped by the defenses.

        Only the wrapping defenses apply (DP-SGD on a GAN's discriminator): one that changes the batch or draws
        several rows per image would need the model's loss, which such a model keeps to itself.
        """
        self.defenses.check_trainer(self.trainer)
        optimizers = self.diffusion.configure_optimizers()
        self._private_optimizer = None
        if not training_defenses(self.defenses):
            return optimizers
        unsupported = training_defenses(self.defenses, BATCH_HOOKS)
        if unsupported or self.defenses.draws_per_example() > 1:
            raise ValueError(
                f"defenses {unsupported or training_defenses(self.defenses)} change the training batch, and "
                f"{type(self.diffusion).__name__} trains itself (its own loss): they do not apply to it; DP-SGD (on its "
                "private module, noise_multiplicity 1), data- and generation-side defenses do"
            )
        self.defenses.check_model(self.diffusion)
        self.diffusion.check_private_training()
        private = self.diffusion.private_module
        owned = {id(p) for p in private.parameters()}
        steps = [i for i, o in enumerate(optimizers) if {id(p) for g in o.param_groups for p in g["params"]} <= owned]
        if len(steps) != 1:
            raise ValueError(f"{type(self.diffusion).__name__}: a training defense needs exactly one optimizer over the "
                             f"private module's parameters, found {len(steps)}")
        self._private_optimizer = steps[0]
        wrapped = self.defenses.wrap_model(private)
        self.diffusion.set_private_module(wrapped)
        optimizers[steps[0]] = self.defenses.wrap_optimizer(optimizers[steps[0]], wrapped)
        return optimizers

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        batch = Batch.of(batch)
        if len(batch) == 0:
            # Poisson sampling (DP-SGD) can draw an empty batch: no forward; the DP optimizer still
            # takes its noise-only step, which the accountant counts. Under DDP every process must
            # run a backward (Lightning refuses a skipped step): a zero loss that reaches every
            # trainable parameter gives zero gradients and no per-sample ones (the DP defense adds none).
            if self.diffusion.owns_training and self._private_optimizer is not None:
                # a self-training model's private optimizer takes the DP step's noise-only update, counted as above
                self.defenses.on_before_optimizer_step(self.diffusion.private_module)
                self._optimizer_list()[self._private_optimizer].step()
                return None
            if self.trainer.world_size == 1:
                return None
            return torch.stack([p.sum() for p in self.diffusion.trainable_parameters()]).sum() * 0.0
        if self.diffusion.owns_training:
            return self._own_training_step(batch)
        batch = self.defenses.transform_batch(batch)
        k = self.defenses.draws_per_example()
        if k > 1:
            # DPDM's noise multiplicity: K (t, noise) draws per image; the DP defense averages the
            # K per-row gradients of one image before clipping, so the privacy unit stays one image.
            batch = batch.repeat_interleave(k)
        loss = self.diffusion.per_example_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=max(1, len(batch) // k))
        return loss

    def _own_training_step(self, batch: Batch) -> None:
        """A step of a model that trains itself: it zeroes, back-propagates and steps its optimizers."""
        optimizers = self._optimizer_list()
        # Lightning counts a global step per LightningOptimizer.step() under manual optimization: the earlier
        # optimizers step unwrapped, so that one training step (one batch) is one global step, as for diffusion.
        stepped = [o.optimizer for o in optimizers[:-1]] + optimizers[-1:]
        losses = self.diffusion.training_step(batch.to(self.device), stepped, self.manual_backward)
        self.ema.step(self.diffusion.trainable_parameters())
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=True, batch_size=len(batch))
        return None

    def _optimizer_list(self) -> list[Any]:
        optimizers = self.optimizers()
        return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        reason = self.defenses.should_stop()
        if reason:
            rank_zero_info(f"privdiff: stopping training: {reason}")
            self.trainer.should_stop = True
            return -1
        return None

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        inputs = self.defenses.backward_inputs(self.diffusion.trainable)
        if inputs is not None:
            kwargs["inputs"] = inputs
        super().backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.defenses.on_before_optimizer_step(self.diffusion.trainable)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Here rather than in on_train_batch_end, which Lightning calls after the callbacks' (the
        # ModelCheckpoint saves there): a checkpoint then holds the EMA of every step it counts.
        self.ema.step(self.diffusion.trainable_parameters())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps
        if not self.trainer.should_stop and (not every or self.trainer.global_step % every):
            return  # Lightning writes step logs every log_every_n_steps only; an accountant's epsilon costs ~0.3 s
        metrics = self.defenses.metrics()
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if numeric:
            self.log_dict(numeric, prog_bar=False, batch_size=1)

    def on_fit_start(self) -> None:
        self.ema.to(self.device)
        if not self.trainer.ckpt_path and self.trainer.is_global_zero:
            self._ledger.unlink(missing_ok=True)  # a new run in this folder: no step of it was released yet
        # What the model needs from data before diffusion training (a latent model's autoencoder),
        # from images of the source that are neither members nor held out.
        dm = self.trainer.datamodule
        public = dm.public_images() if dm is not None and hasattr(dm, "public_images") else None
        members = dm.members if dm is not None and getattr(dm, "members", None) is not None else None
        if self.diffusion.conditioning == "text" and members is not None and members.captions is None:
            raise ValueError(
                "a text-to-image model needs captioned data: data.source: captioned_digits, or data.caption_column "
                "(the text column of a Hugging Face dataset, or of a folder's metadata.jsonl)"
            )
        record = self.diffusion.prepare(public, members) if members is not None else None
        if record:
            rank_zero_info(f"privdiff: model prepared: {record}")

    def on_train_end(self) -> None:
        # Here rather than in on_fit_end, which Lightning calls after the callbacks' (the audit's):
        # the model and what the defenses spent are on disk before anything can fail in the audit.
        if self.trainer.is_global_zero:
            self._note_released(self.trainer.global_step)
            self.export(self.export_path)
            self.defenses.record().save(Path(self.trainer.default_root_dir) / DEFENSES_RECORD)

    # -- released steps ------------------------------------------------------------------------
    # The ledger of the last step whose weights left the process (a checkpoint written, the export): a resume from
    # an earlier checkpoint trains those steps again, and the defenses must count their first run too.
    @property
    def _ledger(self) -> Path:
        return Path(self.trainer.default_root_dir) / RELEASED_LEDGER

    def _released(self) -> int:
        try:
            return int(json.loads(self._ledger.read_text())["global_step"])
        except (FileNotFoundError, KeyError, ValueError):
            return 0

    def _note_released(self, step: int) -> None:
        if step > self._released():
            write_json_atomic(self._ledger, {"global_step": int(step)})

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trainer.is_global_zero:
            self._note_released(int(checkpoint.get("global_step", self.trainer.global_step)))
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["defenses"] = self.defenses.state_dict()
        # A defense's wrapper renames the wrapped module's parameters: store the plain names only.
        checkpoint["state_dict"] = {k.replace(WRAPPED, "."): v for k, v in checkpoint["state_dict"].items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        steps_done = int(checkpoint.get("global_step", 0))
        redone = max(0, self._released() - steps_done)
        for said in self.defenses.resume(checkpoint.get("defenses", {}), steps_done, redone):
            rank_zero_info(f"privdiff: resuming at step {steps_done} after step {steps_done + redone} was released: {said}")
        wrappable = (self.diffusion.trainable, self.diffusion.private_module)
        for name, child in self.diffusion.named_children():  # the trainable or private module, where a defense wrapped it
            if any(child is m for m in wrappable) and unwrap(child) is not child:
                plain, wrapped = f"diffusion.{name}.", f"diffusion.{name}" + WRAPPED
                checkpoint["state_dict"] = {
                    (wrapped + k[len(plain):] if k.startswith(plain) else k): v for k, v in checkpoint["state_dict"].items()
                }

    # -- outputs -------------------------------------------------------------------------------
    @property
    def export_path(self) -> Path:
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.default_root_dir) / "model"

    @contextmanager
    def ema_model(self) -> Iterator[GenerativeModel]:
        """The diffusion model with the EMA weights in place (and any defense's wrapper taken off), in eval mode.

        The training weights and the wrapper are put back when the block ends. What the audit and
        the export use.
        """
        wrapped, params = self.diffusion.trainable, self.diffusion.trainable_parameters()
        was_training = self.diffusion.training
        self.ema.store(params)
        self.ema.copy_to(params)
        self.diffusion.trainable = unwrap(wrapped)
        try:
            yield self.diffusion.eval()
        finally:
            self.diffusion.trainable = wrapped
            self.ema.restore(params)
            self.diffusion.train(was_training)

    def export(self, path: str | Path) -> Path:
        """Write the EMA model as a diffusers folder (``DDPMPipeline.from_pretrained`` loads a pixel model's)."""
        path = Path(path)
        with self.ema_model() as model:
            model.save_pretrained(path)
        rank_zero_info(f"privdiff: exported the EMA model to {path}")
        return path


TRAINING_HOOKS = ("wrap_model", "wrap_optimizer", "wrap_train_loader", "transform_batch", "draws_per_example",
                  "backward_inputs", "on_before_optimizer_step")


BATCH_HOOKS = ("transform_batch",)  # training hooks that need the model's loss, which a self-training model keeps


def training_defenses(stack: DefenseStack, hooks: tuple[str, ...] = TRAINING_HOOKS) -> list[str]:
    """The names of the defenses that override one of ``hooks`` (default: any training-stage hook)."""
    return [d.name for d in stack if any(getattr(type(d), h) is not getattr(Defense, h) for h in hooks)]
