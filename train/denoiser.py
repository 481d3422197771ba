"""Adapter over a diffusers ``UNet2DModel`` and noise scheduler: epsilon prediction, per-sample loss, sampling.

Everything else in privdiff (training, DP-SGD, membership inference, the audit's sampler) talks to a
diffusion model through this one interface, in the spirit of k-diffusion's ``Denoiser`` wrappers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)
from torch import nn

Solver = Literal["ddpm", "ddim", "dpmsolver++"]
SOLVERS: tuple[str, ...] = ("ddpm", "ddim", "dpmsolver++")


def build_unet(
    image_size: int,
    channels: int,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_levels: Sequence[int] = (1,),
    num_classes: int | None = None,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
) -> UNet2DModel:
    """Return a diffusers ``UNet2DModel`` with attention at the given resolution levels.

    ``num_classes`` set makes it class-conditional (an embedding added to the timestep embedding).
    GroupNorm only: BatchNorm would mix examples and break per-example privacy accounting.
    """
    levels = len(block_out_channels)
    bad = [lvl for lvl in attention_levels if not 0 <= lvl < levels]
    if bad:
        raise ValueError(f"attention_levels {bad} out of range 0..{levels - 1} for block_out_channels {list(block_out_channels)}")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"every block_out_channels entry must divide by norm_num_groups={norm_num_groups}, got {list(block_out_channels)}")
    if image_size % (2 ** (levels - 1)):
        raise ValueError(f"image_size {image_size} must divide by {2 ** (levels - 1)} for {levels} resolution levels")
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if (levels - 1 - i) in attention_levels else "UpBlock2D" for i in range(levels))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        num_class_embeds=num_classes,
    )


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    """Return the training noise schedule (epsilon prediction); ``cosine`` is Nichol & Dhariwal's."""
    names = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
    if beta_schedule not in names:
        raise ValueError(f"beta_schedule must be one of {sorted(names)}, got {beta_schedule!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=names[beta_schedule],
        prediction_type="epsilon",
        clip_sample=True,
    )


def unwrap(module: nn.Module) -> nn.Module:
    """Return the plain model inside wrappers such as Opacus's ``GradSampleModule`` or DDP."""
    while hasattr(module, "_module") or hasattr(module, "module"):
        inner = getattr(module, "_module", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


class Denoiser(nn.Module):
    """A diffusion model seen as one object: ``unet`` predicts the noise, ``scheduler`` defines q(x_t|x_0)."""

    def __init__(self, unet: nn.Module, scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.detach().clone().float(), persistent=False
        )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Denoiser":
        """Load a diffusers folder written by :meth:`save_pretrained` (or any DDPMPipeline folder)."""
        path = Path(path)
        if not (path / "unet" / "config.json").is_file() or not (path / "scheduler").is_dir():
            raise ValueError(
                f"{path} is not a diffusers model folder: expected unet/config.json and scheduler/ "
                "(written by `privdiff fit` as <run>/model, or by DDPMPipeline.save_pretrained)"
            )
        if not any((path / "unet").glob("*.safetensors")):
            found = sorted(f.name for f in (path / "unet").iterdir() if f.is_file() and f.name != "config.json")
            raise ValueError(
                f"{path / 'unet'} holds no safetensors weights (found {found or 'nothing'}). privdiff loads weights "
                "from safetensors only: a .bin/.pt file is a pickle that can run code when loaded. If you trust it, "
                "convert it on a machine you trust: UNet2DModel.from_pretrained(DIR, use_safetensors=False)"
                ".save_pretrained(DIR, safe_serialization=True)"
            )
        unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        return cls(unet, scheduler)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder that ``DDPMPipeline.from_pretrained`` loads (safetensors weights)."""
        DDPMPipeline(unet=unwrap(self.unet), scheduler=self.scheduler).save_pretrained(
            str(path), safe_serialization=True
        )

    # -- properties ----------------------------------------------------------------------------
    @property
    def config(self):
        return unwrap(self.unet).config

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def num_classes(self) -> int | None:
        return self.config.num_class_embeds

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.config.in_channels, *size)

    # -- the model -----------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return the predicted noise eps_theta(x_t, t[, y])."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.num_classes is None:
            class_labels = None
        elif class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels")
        return self.unet(x_t, t, class_labels=class_labels).sample

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4)."""
        abar = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def per_sample_loss(
        self,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return the simple DDPM loss ||eps - eps_theta(x_t, t)||^2 averaged per example, shape (B,).

        Ho et al. 2020, eq. 14. Random ``timesteps`` and ``noise`` are drawn when not given.
        """
        b = x0.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (b,), device=x0.device, generator=generator)
        elif timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        timesteps = timesteps.to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        pred = self(self.add_noise(x0, noise, timesteps), timesteps, class_labels)
        return (pred.float() - noise.float()).pow(2).flatten(1).mean(1)

    # -- sampling ------------------------------------------------------------------------------
    def make_sampling_scheduler(self, solver: str):
        """Return a fresh diffusers scheduler for ``solver`` built from the training schedule."""
        config = self.scheduler.config
        if solver == "ddpm":
            return DDPMScheduler.from_config(config)
        if solver == "ddim":
            return DDIMScheduler.from_config(config)
        if solver == "dpmsolver++":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")

    @torch.no_grad()
    def sample_batch(
        self,
        n: int,
        solver: str = "dpmsolver++",
        steps: int = 20,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return ``n`` samples in [-1, 1] from one reverse-process run (no batching, no defenses).

        Use ``privdiff.eval.sampling.generate`` for batched sampling with generation-side defenses.
        """
        if steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {steps}")
        device = next(self.parameters()).device
        sched = self.make_sampling_scheduler(solver)
        sched.set_timesteps(min(steps, self.num_train_timesteps), device=device)
        x = torch.randn((n, *self.image_shape), generator=generator, device="cpu").to(device)
        if class_labels is not None:
            class_labels = class_labels.to(device)
        kwargs = {"generator": generator} if solver != "dpmsolver++" else {}
        for t in sched.timesteps:
            eps = self(x, t.to(device), class_labels)
            x = sched.step(eps, t, x, **kwargs).prev_sample
        return x.clamp(-1, 1)
