"""A pixel-space text-to-image diffusion model, as Imagen, DeepFloyd IF and DALL-E 2's decoder denoise.

One implementation of ``privdiff.model.DiffusionModel``: a ``UNet2DConditionModel`` on pixels scaled to [-1, 1]
that attends to a CLIP text encoder (the real CLIP tokenizer, offline), trained with caption dropout and sampled
with classifier-free guidance (:mod:`privdiff.train.text_model`). Without a VAE its output is the image itself,
so an audit confirms a copy on pixels with no reconstruction floor (Saharia et al. 2022, "Photorealistic
Text-to-Image Diffusion Models with Deep Language Understanding"; Ramesh et al. 2022, the decoder of
"Hierarchical Text-Conditional Image Generation with CLIP Latents").

It saves a folder ``diffusers.IFPipeline.from_pretrained`` loads (DeepFloyd IF's first stage, the pixel
text-to-image pipeline of diffusers). IF's UNet predicts the noise and a variance, so the exported UNet has twice
the image's channels: the noise, then a variance half whose weights are zero and which the folder's scheduler
(fixed variance) ignores. privdiff reads such a folder back with the noise half only::

    from diffusers import IFPipeline
    pipe = IFPipeline.from_pretrained("runs/t2i_pixel/none/model")
    image = pipe("a photo of the digit 3", guidance_scale=1.0, num_inference_steps=50).images[0]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
from torch import nn

from privdiff.membership import ImageTable
from privdiff.weights import require_safetensors

from .denoiser import build_scheduler
from .text_model import (
    MAX_TOKENS,
    TextConditionedDiffusion,
    TextToImageNet,
    offline_clip_tokenizer,
    read_model_record,
    tiny_text_encoder,
    write_model_record,
)

PIPELINE = "IFPipeline"  # model_index.json's _class_name of the folders this model reads and writes

__all__ = ["PixelTextToImage", "noise_half", "unet_image_shape", "with_variance_half"]


def _tiny_unet(image_size: int, channels: int, blocks: Sequence[int], layers: int, head_dim: int, text_width: int) -> nn.Module:
    if image_size % 2 ** (len(blocks) - 1):
        raise ValueError(f"image_size {image_size} must divide by {2 ** (len(blocks) - 1)} for these UNet blocks")
    down = ("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(blocks) - 1)
    up = ("UpBlock2D",) * (len(blocks) - 1) + ("CrossAttnUpBlock2D",)
    return UNet2DConditionModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=tuple(blocks),
        layers_per_block=layers, down_block_types=down, up_block_types=up, cross_attention_dim=text_width,
        attention_head_dim=head_dim, norm_num_groups=8,
    )


def with_variance_half(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of ``unet`` whose output adds a variance half of zeros (IF's UNet predicts noise and variance)."""
    c = unet.config.out_channels
    wide = UNet2DConditionModel.from_config({**unet.config, "out_channels": 2 * c})
    state = unet.state_dict()
    for name in ("conv_out.weight", "conv_out.bias"):
        state[name] = torch.cat([state[name], torch.zeros_like(state[name])])
    wide.load_state_dict(state)
    return wide


def noise_half(unet: UNet2DConditionModel, channels: int | None = None) -> UNet2DConditionModel:
    """The UNet of an IF folder with its noise half of the output only (privdiff's models predict fixed-variance noise);
    ``channels``: the image's (default the UNet's input channels; a super-resolution UNet also takes the low-resolution image)."""
    c = unet.config.in_channels if channels is None else channels
    if unet.config.out_channels == c:
        return unet
    if unet.config.out_channels != 2 * c:
        raise ValueError(f"an IF UNet predicts noise and variance (2 x {c} channels), this one {unet.config.out_channels}")
    narrow = UNet2DConditionModel.from_config({**unet.config, "out_channels": c})
    state = unet.state_dict()
    for name in ("conv_out.weight", "conv_out.bias"):
        state[name] = state[name][:c]
    narrow.load_state_dict(state)
    return narrow


def unet_image_shape(unet: UNet2DConditionModel) -> tuple[int, int, int]:
    """(C, H, W) of the images a pixel UNet denoises: its output channels (the noise) and its sample size."""
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return (int(unet.config.out_channels), int(size), int(size))


class PixelTextToImage(TextConditionedDiffusion):
    """Imagen-style pixel text-to-image model (epsilon prediction, fixed variance), trained fully.

    Args:
        image_size, channels: the images (linked from the data module).
        pretrained: an ``IFPipeline`` folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
            safetensors weights) to fine-tune, e.g. an earlier run's ``model/``; None builds the tiny model below.
        block_out_channels, layers_per_block, attention_head_dim: the tiny conditional UNet (cross-attention at full
            resolution, where a text model of small images needs it).
        text_width, text_layers: the tiny CLIP text encoder; its context is CLIP's 77 tokens, which the IF pipeline
            tokenizes to.
        num_train_timesteps, beta_schedule: the tiny model's noise schedule.
        train_text_encoder: train the text encoder too (its position embeddings stay frozen: Opacus cannot give
            per-example gradients of a table shared by the whole batch).
        caption_dropout: share of training captions replaced by the empty caption, for classifier-free guidance
            (Imagen: 10%).
        guidance_scale: classifier-free guidance of sampling (1 = none).
    """

    pipeline = PIPELINE

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        pretrained: str | None = None,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        text_width: int = 32,
        text_layers: int = 2,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        train_text_encoder: bool = False,
        caption_dropout: float = 0.1,
        guidance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 <= caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.caption_dropout, self.guidance_scale = float(caption_dropout), float(guidance_scale)
        if pretrained is not None:
            unet, text_encoder, tokenizer, scheduler = self._load_parts(Path(pretrained))
        else:
            unet = _tiny_unet(image_size, channels, block_out_channels, layers_per_block, attention_head_dim, text_width)
            text_encoder, tokenizer = tiny_text_encoder(text_width, text_layers, MAX_TOKENS), offline_clip_tokenizer()
            scheduler = build_scheduler(num_train_timesteps, beta_schedule)
        self.trainable = TextToImageNet(unet, text_encoder, end_token=tokenizer.eos_token_id)
        self.tokenizer, self.scheduler = tokenizer, scheduler
        if unet_image_shape(unet) != (channels, image_size, image_size):
            raise ValueError(f"the model makes {unet_image_shape(unet)} images but the data are {(channels, image_size, image_size)}: "
                             "set data.image_size / data.channels to match it")
        text_encoder.requires_grad_(bool(train_text_encoder))
        if train_text_encoder:
            getattr(text_encoder, "text_model", text_encoder).embeddings.position_embedding.requires_grad_(False)
        unet.train()
        text_encoder.train(bool(train_text_encoder))

    @staticmethod
    def _load_parts(folder: Path):
        from transformers import CLIPTextModel, CLIPTokenizer

        for part, model_class in (("unet", "UNet2DConditionModel"), ("text_encoder", "CLIPTextModel")):
            if not (folder / part / "config.json").is_file():
                raise ValueError(f"{folder} is not an IF pipeline folder: expected {part}/config.json (and tokenizer/, scheduler/), "
                                 "as `privdiff fit` writes <run>/model for model.diffusion: PixelTextToImage")
            require_safetensors(folder / part, model_class)
        unet = noise_half(UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True))
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        config = DDPMScheduler.load_config(folder / "scheduler")
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"{folder} predicts {config['prediction_type']!r}: privdiff trains and audits epsilon-prediction models only")
        return unet, text_encoder, CLIPTokenizer.from_pretrained(folder / "tokenizer"), DDPMScheduler.from_config(config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PixelTextToImage":
        """Load an ``IFPipeline`` folder (safetensors weights only) for an audit: the constructor with ``pretrained``."""
        path = Path(path)
        if not (path / "unet" / "config.json").is_file():
            raise ValueError(f"{path} is not an IF pipeline folder: expected unet/config.json")
        config = json.loads((path / "unet" / "config.json").read_text())
        size = config.get("sample_size", 64)
        info = read_model_record(path)
        return cls(image_size=int(size if isinstance(size, int) else size[0]), channels=int(config.get("in_channels", 3)),
                   pretrained=str(path), caption_dropout=0.0, guidance_scale=float(info.get("guidance_scale", 1.0))).eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder ``IFPipeline.from_pretrained`` loads (safetensors weights; no safety checker or watermarker)."""
        path = Path(path)
        net = self.net
        pipe = IFPipeline(tokenizer=self.tokenizer, text_encoder=net.text_encoder, unet=with_variance_half(net.unet),
                          scheduler=self.scheduler, safety_checker=None, feature_extractor=None, watermarker=None,
                          requires_safety_checker=False)
        pipe.save_pretrained(str(path), safe_serialization=True)
        write_model_record(path, {"guidance_scale": self.guidance_scale})

    # -- what it is -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return unet_image_shape(self.net.unet)

    def summary(self) -> dict[str, Any]:
        return {"kind": "pixel text-to-image", "guidance_scale": self.guidance_scale, "export": PIPELINE}

    def prepare(self, public: ImageTable | None, members: ImageTable | None) -> dict[str, Any] | None:
        """Nothing to fit before training (no VAE); warns when member captions are longer than 77 tokens."""
        self.warn_truncated(members)
        return None

    # -- pixels -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device) * 2 - 1

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1).add(1).div(2)
