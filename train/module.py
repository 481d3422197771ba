"""The LightningModule that trains a diffusers UNet as a DDPM, with defenses and EMA weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch.utilities import rank_zero_info

from ..defenses.base import DEFENSES_RECORD, Defense, DefenseStack, as_stack
from .denoiser import Denoiser, build_scheduler, build_unet, unwrap


class DiffusionModule(pl.LightningModule):
    """Trains ``Denoiser(UNet2DModel, DDPMScheduler)`` with the simple epsilon loss (Ho et al. 2020).

    Args:
        image_size, channels: linked from the data module.
        block_out_channels, layers_per_block, attention_levels: UNet size; attention at the listed
            resolution levels (0 = full resolution).
        num_classes: set for a class-conditional model (labels required in the data).
        num_train_timesteps, beta_schedule: the noise schedule (``linear`` or ``cosine``).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
        ema_decay: maximum decay of the EMA weights (diffusers ``EMAModel`` with warm-up); the
            audit and the export use the EMA weights.
        defenses: training-stage defenses (the same instances as the data module's).
        export_dir: where to write the diffusers folder at the end of fit (default <run>/model).
    """

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_levels: Sequence[int] = (1,),
        num_classes: int | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
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
        self.save_hyperparameters(ignore=["defenses"])
        unet = build_unet(image_size, channels, block_out_channels, layers_per_block, attention_levels, num_classes)
        self.denoiser = Denoiser(unet, build_scheduler(num_train_timesteps, beta_schedule))
        self.defenses: DefenseStack = as_stack(defenses)
        self.ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=2 / 3)

    @property
    def noise_multiplicity(self) -> int:
        return max([getattr(d, "noise_multiplicity", 1) for d in self.defenses] + [1])

    # -- training ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        self.defenses.check_trainer(self.trainer)
        self.denoiser.unet = self.defenses.wrap_model(self.denoiser.unet)
        optimizer = torch.optim.AdamW(
            self.denoiser.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        optimizer = self.defenses.wrap_optimizer(optimizer, self.denoiser.unet)
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        if images.shape[0] == 0:
            # Poisson sampling (DP-SGD) can draw an empty batch: no forward; the DP optimizer still
            # takes its noise-only step, which the accountant counts. Under DDP every process must
            # run a backward (Lightning refuses a skipped step): a zero loss that reaches every
            # parameter gives zero gradients and no per-sample ones (the DP defense adds none).
            if self.trainer.world_size == 1:
                return None
            return torch.stack([p.sum() for p in self.denoiser.unet.parameters() if p.requires_grad]).sum() * 0.0
        k = self.noise_multiplicity
        if k > 1:
            # DPDM's noise multiplicity: K (t, noise) draws per image; the DP defense averages the
            # K per-row gradients of one image before clipping, so the privacy unit stays one image.
            images, labels = images.repeat_interleave(k, 0), labels.repeat_interleave(k, 0)
        class_labels = labels if self.hparams.num_classes else None
        loss = self.denoiser.per_sample_loss(images, class_labels).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=max(1, images.shape[0] // k))
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        reason = self.defenses.should_stop()
        if reason:
            rank_zero_info(f"privdiff: stopping training: {reason}")
            self.trainer.should_stop = True
            return -1
        return None

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        inputs = self.defenses.backward_inputs(self.denoiser.unet)
        if inputs is not None:
            kwargs["inputs"] = inputs
        super().backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.defenses.on_before_optimizer_step(self.denoiser.unet)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Here rather than in on_train_batch_end, which Lightning calls after the callbacks' (the
        # ModelCheckpoint saves there): a checkpoint then holds the EMA of every step it counts.
        self.ema.step(unwrap(self.denoiser.unet).parameters())

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

    def on_train_end(self) -> None:
        # Here rather than in on_fit_end, which Lightning calls after the callbacks' (the audit's):
        # the model and what the defenses spent are on disk before anything can fail in the audit.
        if self.trainer.is_global_zero:
            self.export(self.export_path)
            self.defenses.record().save(Path(self.trainer.default_root_dir) / DEFENSES_RECORD)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["defenses"] = self.defenses.state_dict()
        # The wrapped model's parameter names differ ("_module."): store the plain ones only.
        checkpoint["state_dict"] = {
            k.replace("unet._module.", "unet."): v for k, v in checkpoint["state_dict"].items()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        states = checkpoint.get("defenses", {})
        dp = self.defenses.find("dp_sgd")
        if dp is not None and "dp_sgd" not in states and checkpoint.get("global_step", 0) > 0 and not getattr(dp, "new_budget", False):
            raise ValueError(
                f"the checkpoint's {checkpoint['global_step']} training steps ran without dp_sgd: epsilon would not "
                "cover them. Resume it without dp_sgd, or, if those steps saw public data only, set dp_sgd "
                "new_budget: true to start accounting here"
            )
        self.defenses.load_state_dict(states)
        if unwrap(self.denoiser.unet) is not self.denoiser.unet:
            checkpoint["state_dict"] = {
                k.replace("denoiser.unet.", "denoiser.unet._module."): v for k, v in checkpoint["state_dict"].items()
            }

    # -- outputs -------------------------------------------------------------------------------
    @property
    def export_path(self) -> Path:
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.default_root_dir) / "model"

    def ema_denoiser(self) -> Denoiser:
        """Return a plain copy of the model carrying the EMA weights (the ones audited and exported)."""
        unet = copy.deepcopy(unwrap(self.denoiser.unet))
        self.ema.copy_to(unet.parameters())
        return Denoiser(unet, self.denoiser.scheduler).to(self.device).eval()

    def export(self, path: str | Path) -> Path:
        """Write the EMA model as a diffusers folder that ``DDPMPipeline.from_pretrained`` loads."""
        path = Path(path)
        self.ema_denoiser().cpu().save_pretrained(path)
        rank_zero_info(f"privdiff: exported the EMA model to {path}")
        return path
