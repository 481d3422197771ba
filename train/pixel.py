"""A pixel-space diffusion model: a diffusers ``UNet2DModel`` (optionally class-conditional) with a DDPM schedule.

One implementation of ``privdiff.model.DiffusionModel``. It trains from scratch (the UNet built
from the hyper-parameters below) or fine-tunes a saved model (``pretrained``: a folder written by
``DDPMPipeline.save_pretrained``, e.g. an earlier run's ``model/``), and saves a folder that
``DDPMPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from privdiff.model import DiffusionModel
from privdiff.weights import require_safetensors

from .denoiser import build_scheduler, build_unet, reverse_process, unwrap

PIPELINE = "DDPMPipeline"  # model_index.json's _class_name of the folders this model reads and writes


def _check_pixel_folder(path: Path) -> None:
    if not (path / "unet" / "config.json").is_file() or not (path / "scheduler").is_dir():
        raise ValueError(
            f"{path} is not a diffusers model folder: expected unet/config.json and scheduler/ "
            "(written by `privdiff fit` as <run>/model, or by DDPMPipeline.save_pretrained)"
        )
    require_safetensors(path / "unet", "UNet2DModel")


class PixelDiffusion(DiffusionModel):
    """``UNet2DModel`` + ``DDPMScheduler`` on pixels scaled to [-1, 1] (Ho et al. 2020).

    Args:
        image_size, channels: the images (linked from the data module by ``privdiff fit``).
        block_out_channels, layers_per_block, attention_levels: UNet size; attention at the listed
            resolution levels (0 = full resolution). Ignored with ``pretrained``.
        norm_num_groups, attention_head_dim: GroupNorm groups (each block_out_channels entry must divide
            by it; the CIFAR-10 DDPM of Ho et al. uses 32) and channels per attention head. Ignored with
            ``pretrained``.
        num_classes: set for a class-conditional model (labels required in the data).
        num_train_timesteps, beta_schedule: the noise schedule (``linear`` or ``cosine``).
        pretrained: a diffusers folder (``DDPMPipeline``: ``unet/`` + ``scheduler/``) to start from
            instead of random weights; its image size and channels must match the data.
    """

    pipeline = PIPELINE

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
        pretrained: str | None = None,
        norm_num_groups: int = 8,
        attention_head_dim: int = 8,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            unet, scheduler = self._load_parts(Path(pretrained))
            unet.train()  # diffusers loads in eval mode; a module to train starts in training mode, as a fresh one does
            shape = (unet.config.in_channels, *self._size(unet))
            if shape != (channels, image_size, image_size):
                raise ValueError(
                    f"pretrained model {pretrained} makes {shape} images but the data are "
                    f"{(channels, image_size, image_size)}: set data.image_size / data.channels to match it"
                )
        else:
            unet = build_unet(image_size, channels, block_out_channels, layers_per_block, attention_levels, num_classes,
                              norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim)
            scheduler = build_scheduler(num_train_timesteps, beta_schedule)
        self._assemble(unet, scheduler)

    def _assemble(self, unet: nn.Module, scheduler: DDPMScheduler) -> None:
        self.trainable = unet
        self.scheduler = scheduler

    @classmethod
    def from_parts(cls, unet: nn.Module, scheduler: DDPMScheduler) -> "PixelDiffusion":
        """A model around an existing UNet and schedule (tests, benchmarks)."""
        model = cls.__new__(cls)
        DiffusionModel.__init__(model)
        model._assemble(unet, scheduler)
        return model

    @staticmethod
    def _load_parts(path: Path) -> tuple[UNet2DModel, DDPMScheduler]:
        _check_pixel_folder(path)
        return UNet2DModel.from_pretrained(path / "unet", use_safetensors=True), DDPMScheduler.from_pretrained(path / "scheduler")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PixelDiffusion":
        """Load a ``DDPMPipeline`` folder (``privdiff fit``'s ``<run>/model``), safetensors weights only."""
        return cls.from_parts(*cls._load_parts(Path(path)))

    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder that ``DDPMPipeline.from_pretrained`` loads (safetensors weights)."""
        DDPMPipeline(unet=unwrap(self.trainable), scheduler=self.scheduler).save_pretrained(str(path), safe_serialization=True)

    # -- what it is -------------------------------------------------------------------------
    @property
    def unet_config(self) -> Any:
        return unwrap(self.trainable).config

    @staticmethod
    def _size(unet: nn.Module) -> tuple[int, int]:
        size = unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.unet_config.in_channels, *self._size(unwrap(self.trainable)))

    @property
    def conditioning(self) -> str | None:
        return "class" if self.num_classes else None

    @property
    def num_classes(self) -> int | None:
        return self.unet_config.num_class_embeds

    # -- the model --------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1

    def decode(self, x0: Tensor) -> Tensor:
        return x0.clamp(-1, 1).add(1).div(2)

    def embed_condition(self, cond: Any) -> Tensor | None:
        if self.num_classes is None:
            return None
        if not isinstance(cond, Tensor):
            raise ValueError("this model is class-conditional: the data must carry class labels (data.label_column)")
        return cond.clamp(min=0).long()

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.num_classes is None:
            cond = None
        elif cond is None:
            raise ValueError("this model is class-conditional: pass class labels")
        else:
            cond = cond.to(x_t.device)
        return self.trainable(x_t, t, class_labels=cond).sample

    @torch.no_grad()
    def sample(
        self,
        n: int,
        solver: str = "ancestral",
        steps: int = 50,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        embedded = self.embed_condition(cond) if cond is not None else None
        x = reverse_process(
            lambda x_t, t: self.predict_noise(x_t, t, embedded), self.scheduler, (n, *self.image_shape),
            solver, steps, self.device, generator,
        )
        return self.decode(x)
