"""A latent text-to-image diffusion model from Stable Diffusion's parts: VAE, conditional UNet, CLIP text encoder.

One implementation of ``privdiff.model.DiffusionModel``. ``pretrained`` loads a Stable Diffusion
1.x/2.x folder (the real use, on a GPU: fine-tune it fully or with LoRA adapters); without it a tiny
pipeline is built from config (tests, the offline demo), whose VAE first learns to reconstruct
public images of the run (:meth:`LatentTextToImage.prepare`), because a VAE with random weights is
not an autoencoder. The model saves a folder ``StableDiffusionPipeline.from_pretrained`` loads, and
with LoRA also the adapter weights ``pipe.load_lora_weights(folder / "lora")`` loads.

The text conditioning (CLIP tokenizer, caption dropout, classifier-free guidance) is shared with the pixel
text-to-image model (:mod:`privdiff.train.text_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from privdiff.membership import ImageTable
from privdiff.weights import privdiff_cache, require_safetensors

from .denoiser import build_scheduler
from .preparation import AutoencoderFit, CachedFit, PublicPretraining, run_preparation
from .text_model import (
    MAX_TOKENS,
    TextConditionedDiffusion,
    TextToImageNet,
    offline_clip_tokenizer,
    read_model_record,
    tiny_text_encoder,
    write_model_record,
)

PIPELINE = "StableDiffusionPipeline"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts
NON_MEMBERS = "non-member images of the source (neither members nor held out)"


def _tiny_parts(image_size, channels, latent_channels, vae_blocks, blocks, layers, head_dim, text_width, text_layers, max_tokens,
                timesteps, schedule):
    """The tiny pipeline's parts, built from config: VAE, conditional UNet, CLIP text encoder, the real CLIP tokenizer, scheduler."""
    levels = len(vae_blocks)
    if image_size % 2 ** (levels - 1 + len(blocks) - 1):
        raise ValueError(f"image_size {image_size} must divide by {2 ** (levels - 1 + len(blocks) - 1)} for these VAE and UNet blocks")
    vae = AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=latent_channels, block_out_channels=tuple(vae_blocks),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, norm_num_groups=8, sample_size=image_size,
    )
    down = ("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(blocks) - 1)
    up = ("UpBlock2D",) * (len(blocks) - 1) + ("CrossAttnUpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (levels - 1), in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(blocks), layers_per_block=layers, down_block_types=down, up_block_types=up,
        cross_attention_dim=text_width, attention_head_dim=head_dim, norm_num_groups=8,
    )
    text_encoder = tiny_text_encoder(text_width, text_layers, max_tokens)
    scheduler = build_scheduler(timesteps, schedule)
    scheduler.register_to_config(clip_sample=False, steps_offset=1)  # latents are not bounded to [-1, 1]; SD's offset
    return vae, unet, text_encoder, offline_clip_tokenizer(max_tokens=max_tokens), scheduler


class LatentTextToImage(TextConditionedDiffusion):
    """Stable-Diffusion-style latent text-to-image model (epsilon prediction), trained fully or with LoRA.

    Args:
        image_size, channels: the pixel images (linked from the data module).
        pretrained: a Stable Diffusion folder (``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
            ``scheduler/``, safetensors weights) to fine-tune; None builds the tiny model below.
        latent_channels, vae_block_out_channels: the tiny VAE (it halves the size per extra block).
        block_out_channels, layers_per_block, attention_head_dim: the tiny conditional UNet.
        text_width, text_layers: the tiny CLIP text encoder (the real CLIP tokenizer, offline).
        max_tokens: the tiny text encoder's context length (CLIP's 77). Every UNet call attends to all of
            it, so a model of short captions trains and samples faster with fewer (the built-in captions
            take 17-20 tokens). Longer captions are truncated, as Stable Diffusion truncates at 77;
            :meth:`prepare` warns before training when a member caption is.
        num_train_timesteps, beta_schedule: the tiny model's noise schedule.
        lora_rank: train LoRA adapters of this rank on the UNet's attention projections (everything
            else frozen); None trains the whole UNet.
        lora_alpha: LoRA scaling (default the rank).
        train_text_encoder: train the text encoder too (not with LoRA; its position embeddings stay
            frozen: Opacus cannot give per-example gradients of a table shared by the whole batch).
        caption_dropout: share of training captions replaced by the empty caption, for classifier-free
            guidance (Stable Diffusion: 0.1).
        guidance_scale: classifier-free guidance of sampling (1 = none).
        vae_steps, vae_lr, vae_batch_size: how the tiny VAE learns to reconstruct before training.
        vae_cache: keep the VAE trained on public images in ``$XDG_CACHE_HOME/privdiff/vae``, by content
            (its initial weights, settings and images), so that runs of the same source, split and seed
            train it once (false: always train).
        pretrain_steps, pretrain_lr, pretrain_batch_size: non-private pretraining of the tiny UNet and text encoder on public
            captioned images (neither members nor held out) before the private training: the base that
            a (DP-)LoRA fine-tune starts from (0: none).
    """

    pipeline = PIPELINE

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        pretrained: str | None = None,
        latent_channels: int = 4,
        vae_block_out_channels: Sequence[int] = (32, 64),
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        text_width: int = 32,
        text_layers: int = 2,
        max_tokens: int = MAX_TOKENS,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        train_text_encoder: bool = False,
        caption_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        vae_steps: int = 400,
        vae_lr: float = 1e-3,
        vae_batch_size: int = 64,
        vae_cache: bool = True,
        pretrain_steps: int = 0,
        pretrain_lr: float = 1e-3,
        pretrain_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if not 0 <= caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if not 3 <= max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be in [3, {MAX_TOKENS}] (start, a word, end), got {max_tokens}")
        if lora_rank is not None and (lora_rank < 1 or train_text_encoder):
            raise ValueError(f"LoRA needs lora_rank >= 1 and a frozen text encoder, got rank {lora_rank}, train_text_encoder={train_text_encoder}")
        self.caption_dropout, self.guidance_scale = float(caption_dropout), float(guidance_scale)
        self.vae_steps, self.vae_lr, self.vae_batch_size = vae_steps, vae_lr, vae_batch_size
        self.vae_cache = bool(vae_cache)
        if pretrain_steps < 0 or (pretrain_steps and pretrained is not None):
            raise ValueError(f"pretrain_steps must be >= 0 and is for the tiny model built from config (a pretrained "
                             f"folder is its own base), got {pretrain_steps} with pretrained={pretrained!r}")
        if pretrain_batch_size < 1:
            raise ValueError(f"pretrain_batch_size must be >= 1, got {pretrain_batch_size}")
        self.pretrain_steps, self.pretrain_lr, self.pretrain_batch_size = int(pretrain_steps), float(pretrain_lr), int(pretrain_batch_size)
        if pretrained is not None:
            vae, unet, text_encoder, tokenizer, scheduler = self._load_parts(Path(pretrained))
            ready = True
        else:
            vae, unet, text_encoder, tokenizer, scheduler = _tiny_parts(
                image_size, channels, latent_channels, vae_block_out_channels, block_out_channels, layers_per_block,
                attention_head_dim, text_width, text_layers, max_tokens, num_train_timesteps, beta_schedule,
            )
            ready = False
        self._assemble(vae, unet, text_encoder, tokenizer, scheduler, ready)
        shape = self.image_shape
        if shape != (channels, image_size, image_size):
            raise ValueError(f"the model makes {shape} images but the data are {(channels, image_size, image_size)}: "
                             "set data.image_size / data.channels to match it")
        text_encoder.requires_grad_(bool(train_text_encoder))
        if train_text_encoder:
            getattr(text_encoder, "text_model", text_encoder).embeddings.position_embedding.requires_grad_(False)
        if lora_rank is not None:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian",
                                        target_modules=list(LORA_TARGETS)))
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha or lora_rank
        unet.train()
        text_encoder.train(bool(train_text_encoder))

    # -- parts -----------------------------------------------------------------------------
    @staticmethod
    def _load_parts(folder: Path):
        from transformers import CLIPTextModel, CLIPTokenizer

        for part in ("vae", "unet", "text_encoder"):
            if not (folder / part / "config.json").is_file():
                raise ValueError(f"{folder} is not a Stable Diffusion folder: expected {part}/config.json (and tokenizer/, scheduler/)")
        for part, model_class in (("vae", "AutoencoderKL"), ("unet", "UNet2DConditionModel"), ("text_encoder", "CLIPTextModel")):
            require_safetensors(folder / part, model_class)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        config = DDPMScheduler.load_config(folder / "scheduler")
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"{folder} predicts {config['prediction_type']!r}: privdiff trains and audits epsilon-prediction models only")
        scheduler = DDPMScheduler.from_config({**config, "clip_sample": False})
        return vae, unet, text_encoder, tokenizer, scheduler

    def _assemble(self, vae, unet, text_encoder, tokenizer, scheduler, ready: bool) -> None:
        vae.requires_grad_(False)
        self.vae = vae.eval()
        self.trainable = TextToImageNet(unet, text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.register_buffer("latent_scale", torch.tensor(float(getattr(vae.config, "scaling_factor", 1.0))))
        self.register_buffer("vae_ready", torch.tensor(bool(ready)))
        self.vae_record: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LatentTextToImage":
        """Load a ``StableDiffusionPipeline`` folder (safetensors weights only) for an audit: the constructor with
        ``pretrained=path``, at the image size the folder's configs give, and nothing to train before use."""
        path = Path(path)
        configs = {}
        for part in ("vae", "unet"):
            if not (path / part / "config.json").is_file():
                raise ValueError(f"{path} is not a Stable Diffusion folder: expected {part}/config.json (and text_encoder/, tokenizer/, scheduler/)")
            configs[part] = json.loads((path / part / "config.json").read_text())
        size = configs["unet"].get("sample_size", 64)
        size = (size if isinstance(size, int) else size[0]) * 2 ** (len(configs["vae"].get("block_out_channels", [0])) - 1)
        info = read_model_record(path)
        model = cls(image_size=int(size), channels=int(configs["vae"].get("in_channels", 3)), pretrained=str(path),
                    caption_dropout=0.0, guidance_scale=float(info.get("guidance_scale", 1.0)), vae_steps=0, vae_cache=False)
        model.vae_record = info.get("vae", {})
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write a ``StableDiffusionPipeline`` folder (LoRA fused into the UNet) and, with LoRA, ``lora/`` for ``load_lora_weights``."""
        path = Path(path)
        net = self.net
        unet = net.unet
        if self.lora_rank is not None:
            from peft.utils import get_peft_model_state_dict

            from peft import LoraConfig

            StableDiffusionPipeline.save_lora_weights(path / "lora", unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
            # A fresh copy to fuse (not a deepcopy: the trained UNet may carry a defense's hooks, e.g. Opacus's).
            fused = UNet2DConditionModel.from_config(unet.config)
            fused.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=list(LORA_TARGETS)))
            fused.load_state_dict(unet.state_dict())
            fused.fuse_lora()
            fused.unload_lora()
            unet = fused
        self.vae.register_to_config(scaling_factor=float(self.latent_scale))
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=net.text_encoder, tokenizer=self.tokenizer, unet=unet, scheduler=self.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(str(path), safe_serialization=True)
        write_model_record(path, {"vae": self.vae_record, "guidance_scale": self.guidance_scale})

    # -- what it is -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.net.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (int(self.vae.config.in_channels), size * factor, size * factor)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.net.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (int(self.net.unet.config.in_channels), size, size)

    def get_extra_state(self) -> dict[str, Any]:  # kept in checkpoints: a resume reports the autoencoder too
        return {"vae_record": json.dumps(self.vae_record)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.vae_record = json.loads(state.get("vae_record", "{}"))

    def summary(self) -> dict[str, Any]:
        return {"kind": "latent text-to-image", "lora_rank": self.lora_rank, "guidance_scale": self.guidance_scale,
                "latent_shape": list(self.latent_shape), "vae": self.vae_record}

    # -- the preparation stages -------------------------------------------------------------
    def prepare(self, public: ImageTable | None, members: ImageTable | None) -> dict[str, Any] | None:
        """Teach the tiny VAE to reconstruct before the diffusion training (nothing for a pretrained one).

        It learns from ``public`` images (of the source, neither members nor held out) so that it
        memorizes no member (they are still the user's images: the autoencoder is outside the
        membership audit and any DP guarantee of the diffusion training); without any it falls back to the members and says so (the autoencoder
        is then trained on private data outside any DP guarantee). Sets the latent scale to 1 / std
        of the latents (Stable Diffusion's scaling factor) and returns the record: images, steps,
        reconstruction l2 (Carlini et al.'s, on [0, 1]) on images it did not train on. With
        ``pretrain_steps`` the base of the UNet and text encoder is then pretrained on the public images.
        Both are Lightning stages (:mod:`privdiff.train.preparation`).
        """
        self.warn_truncated(members)
        if bool(self.vae_ready):
            return self.vae_record or None
        unused = public is not None and len(public) >= 16
        source = NON_MEMBERS if unused else "member images (no other images in the source: outside any DP guarantee)"
        table = public if unused else members
        cache = self._vae_cache(table) if unused and self.vae_cache else None
        kept = cache.load() if cache is not None else None
        if kept is not None:
            tensors, metadata = kept
            self.vae.load_state_dict({k[len("vae."):]: v for k, v in tensors.items() if k.startswith("vae.")})
            self.latent_scale.fill_(float(tensors["latent_scale"][0]))
            self.vae_record = {**json.loads(metadata.get("privdiff.vae_record", "{}")), "cache": str(cache.path)}
        else:
            self.vae_record = {"trained_on": source, **self._fit_vae(table.unit())}
            if cache is not None:
                cache.save({**{f"vae.{k}": v for k, v in self.vae.state_dict().items()}, "latent_scale": self.latent_scale.reshape(1)},
                           {"privdiff.vae_record": json.dumps(self.vae_record)})
                self.vae_record["cache"] = str(cache.path)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP every process trains (or loads) the same autoencoder; rank 0's weights make sure they agree
            # bit for bit (GPU kernels need not be deterministic).
            for tensor in [*self.vae.parameters(), self.latent_scale]:
                torch.distributed.broadcast(tensor.data, src=0)
        if self.pretrain_steps:
            self.vae_record["pretrained"] = self._pretrain(public if unused else None)
        self.vae_ready.fill_(True)
        return self.vae_record

    def _fit_vae(self, images: Tensor) -> dict[str, Any]:
        """Fit the VAE to 90% of ``images`` (seeded), set the latent scale; the record without its source."""
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(images), generator=g)
        cut = max(1, int(len(images) * 0.9))
        train, check = images[order[:cut]], images[order[cut:]] if len(images) > cut else images[order[:cut]]
        fit = AutoencoderFit(self.vae, self.vae_lr)
        run_preparation(fit, fit.batches(train, self.vae_steps, self.vae_batch_size, g))
        with torch.no_grad():
            latents = torch.cat([self.vae.encode(train[i : i + 256].to(self.device) * 2 - 1).latent_dist.mean for i in range(0, len(train), 256)])
            self.latent_scale.fill_(float(1.0 / latents.std().clamp(min=1e-6)))
            recon = self.decode(self.encode(check.to(self.device)))
            l2 = float((recon.cpu() - check).pow(2).flatten(1).mean(1).sqrt().mean())
        return {"num_images": int(cut), "steps": int(self.vae_steps), "reconstruction_l2": l2, "num_checked": int(len(check)),
                "latent_scale": float(self.latent_scale)}

    # The VAE learns from public images only, so every run of the same source, split and model trains the same
    # one (a comparison's settings, a repeated command): it is kept by content, as the FID classifier is.
    def _vae_cache(self, table: ImageTable) -> CachedFit:
        # diffusers' private config keys are left out: `_use_default_values` lists a set, in another order per process
        config = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
        settings = json.dumps({"version": 1, "vae": config, "steps": self.vae_steps, "lr": self.vae_lr,
                               "batch_size": self.vae_batch_size}, sort_keys=True, default=str)
        weights = [part for name, tensor in sorted(self.vae.state_dict().items()) for part in (name, tensor)]  # the initial weights (the seed)
        return CachedFit.keyed(privdiff_cache("vae"), settings, *weights, table.images)

    def _pretrain(self, public: ImageTable | None) -> dict[str, Any]:
        """Pretrain the UNet and text encoder (not the adapters) on public captioned images: the base a DP-LoRA fine-tune
        starts from (:class:`PublicPretraining`). Non-private and outside any DP guarantee, which is why it only takes
        images that are neither members nor held out."""
        if public is None or public.captions is None:
            raise ValueError("model.diffusion.init_args.pretrain_steps needs public captioned images (non-members of the "
                             "source, at least 16): this source has none left; set pretrain_steps: 0")
        images = public.unit()
        fit = PublicPretraining(self.net, self.pretrain_lr, self.encode, self.add_noise, self.embed_condition)
        run_preparation(fit, fit.batches(images, public.captions, self.pretrain_steps, self.pretrain_batch_size, self.caption_dropout,
                                         self.num_train_timesteps, self.latent_shape, torch.Generator().manual_seed(1)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in fit.base:
                torch.distributed.broadcast(p.data, src=0)
        return {"trained_on": NON_MEMBERS, "num_images": len(images), "steps": int(self.pretrain_steps),
                "batch_size": min(self.pretrain_batch_size, len(images)), "final_loss": float(fit.final_loss)}

    # -- between pixels and latents ---------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        with torch.no_grad():  # the VAE is frozen while the diffusion model trains
            return self.vae.encode(images.to(self.device) * 2 - 1).latent_dist.mean * self.latent_scale

    def decode(self, x0: Tensor) -> Tensor:
        with torch.no_grad():
            return self.vae.decode(x0 / self.latent_scale).sample.clamp(-1, 1).add(1).div(2)
