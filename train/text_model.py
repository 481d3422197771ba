"""What the text-to-image models share: the CLIP tokenizer and text encoder, caption dropout, classifier-free guidance.

Two implementations of ``privdiff.model.DiffusionModel`` build on :class:`TextConditionedDiffusion`: the latent one of
Stable Diffusion (:mod:`privdiff.train.latent`, a VAE between pixels and the UNet) and the pixel one of Imagen,
DeepFloyd IF and DALL-E 2's decoder (:mod:`privdiff.train.pixel_text`). Both denoise with a ``UNet2DConditionModel``
that attends to the CLIP text encoder's hidden states, train with a share of empty captions (Ho & Salimans 2022), and
sample with classifier-free guidance.

Offline the CLIP tokenizer is built from the BPE file open-clip-torch ships (the real CLIP merges):
vocabulary = the 256 byte symbols, their ``</w>`` forms, the merges joined, then ``<|startoftext|>``
and ``<|endoftext|>`` (49408 tokens), as ``open_clip.tokenizer.SimpleTokenizer`` builds it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from privdiff.files import write_json_atomic
from privdiff.membership import ImageTable
from privdiff.model import Batch, DiffusionModel
from privdiff.weights import privdiff_cache

from .denoiser import reverse_process, unwrap

MAX_TOKENS = 77  # CLIP's context length, Stable Diffusion's and DeepFloyd IF's
MODEL_RECORD = "privdiff_model.json"  # what a saved folder keeps beside the pipeline (guidance scale, the VAE's record)

__all__ = ["MAX_TOKENS", "TextConditionedDiffusion", "TextToImageNet", "offline_clip_tokenizer", "read_model_record", "tiny_text_encoder",
           "write_model_record"]


def offline_clip_tokenizer(cache_dir: str | Path | None = None, max_tokens: int = MAX_TOKENS):
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary, from open-clip-torch's BPE file (no download)."""
    from open_clip import tokenizer as open_clip_tokenizer
    from transformers import CLIPTokenizer

    folder = Path(cache_dir) if cache_dir else privdiff_cache("clip_tokenizer")
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        merges = gzip.open(open_clip_tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        symbols = list(open_clip_tokenizer.bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_tokens)


def tiny_text_encoder(text_width: int, text_layers: int, max_tokens: int) -> nn.Module:
    """A CLIP text encoder of the given width and depth with random weights (the tiny models built from config)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_width // 16), max_position_embeddings=max_tokens,
    ))


def read_model_record(folder: Path) -> dict[str, Any]:
    """The privdiff record a saved text-to-image folder keeps beside its pipeline ({} for a folder from elsewhere)."""
    record = Path(folder) / MODEL_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def write_model_record(folder: Path, record: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / MODEL_RECORD, record)


class TextToImageNet(nn.Module):
    """What training updates: the conditional UNet (all of it, or its LoRA adapters) and, optionally, the text encoder.

    One module with one forward (noisy inputs, timesteps, token ids -> predicted noise), so that a
    defense can wrap it whole (DP-SGD's per-example gradients then cover every trainable parameter
    and nothing frozen). With ``mask_padding`` the text encoder is called with the tokenizer's attention mask
    (the positions after a caption's end token masked), as DeepFloyd IF's pipeline calls it; Stable Diffusion's
    pipeline calls it without.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, end_token: int | None = None) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.end_token = end_token  # None: no attention mask

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor, embedding_noise: float = 0.0) -> Tensor:
        return self.unet(x_t, t, encoder_hidden_states=self.hidden_states(input_ids, embedding_noise)).sample

    def hidden_states(self, input_ids: Tensor, embedding_noise: float = 0.0) -> Tensor:
        """What the UNet attends to: the text encoder's hidden states (B, max_tokens, W) of token ids (B, max_tokens), or
        the hidden states of a prompt a defense adjusted as they are; plus a caption defense's noise of std ``embedding_noise``."""
        hidden = input_ids if input_ids.is_floating_point() else self.encode_text(input_ids)
        if embedding_noise:  # a caption defense's Gaussian noise on the text embedding (Somepalli et al. 2023)
            hidden = hidden + embedding_noise * torch.randn_like(hidden)
        return hidden

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """The text encoder's last hidden states (B, max_tokens, W) of token ids."""
        if self.end_token is None:
            return self.text_encoder(input_ids)[0]
        end = (input_ids == self.end_token).long()
        mask = (end.cumsum(1) - end) == 0  # up to and including the first end token: the tokenizer's attention mask
        return self.text_encoder(input_ids, attention_mask=mask.long())[0]


class TextConditionedDiffusion(DiffusionModel):
    """A text-to-image diffusion model: ``trainable`` is a :class:`TextToImageNet`, ``tokenizer`` a CLIP tokenizer.

    Subclasses set ``trainable``, ``tokenizer``, ``scheduler``, ``caption_dropout`` and ``guidance_scale`` and give
    ``encode``/``decode`` (pixels <-> what the UNet denoises) and the folder they save.
    """

    caption_dropout: float
    guidance_scale: float

    @property
    def net(self) -> TextToImageNet:
        return unwrap(self.trainable)

    @property
    def max_tokens(self) -> int:
        """The text encoder's context length: captions are padded or truncated to it."""
        return int(self.tokenizer.model_max_length)

    @property
    def calls_per_sampling_step(self) -> int:
        return 1 if self.guidance_scale == 1.0 else 2

    @property
    def conditioning(self) -> str:
        return "text"

    def warn_truncated(self, members: ImageTable | None) -> None:
        """Warn, before training, when member captions are longer than the text encoder's context."""
        if members is None or members.captions is None:
            return
        lengths = [len(ids) for ids in self.tokenizer(list(members.captions), verbose=False).input_ids]
        long = [(n, caption) for n, caption in zip(lengths, members.captions) if n > self.max_tokens]
        if long:
            n, caption = max(long)
            rank_zero_warn(
                f"{len(long)} of {len(lengths)} member captions are longer than the text encoder's {self.max_tokens} tokens "
                f"and are truncated (the longest has {n}: {caption[:80]!r}); the model sees only their first "
                f"{self.max_tokens} tokens, so captions that begin alike look alike to it. For the tiny model, raise "
                f"model.diffusion.init_args.max_tokens (at most {MAX_TOKENS})"
            )

    def embed_condition(self, cond: Tensor | Sequence[str] | None) -> Tensor | None:
        """Captions -> CLIP token ids (B, max_tokens), on the model's device; a prompt embedding (B, max_tokens, W) passes unchanged."""
        if cond is None:
            return None
        if isinstance(cond, Tensor) and cond.is_floating_point() and cond.ndim == 3:
            return cond.to(self.device)
        if isinstance(cond, Tensor):
            raise ValueError("a text-to-image model is conditioned on captions, got a tensor (class labels?): "
                             "give the data captions (data.caption_column, or data.source: captioned_digits)")
        ids = self.tokenizer(list(cond), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def condition_embedding(self, cond: Tensor | Sequence[str] | None) -> Tensor | None:
        """Captions -> the text encoder's last hidden states (B, max_tokens, W): what the UNet attends to."""
        ids = self.embed_condition(cond)
        if ids is None or ids.is_floating_point():
            return ids
        return self.net.encode_text(ids)

    def embed_batch_condition(self, batch: Batch) -> Any:
        ids = self.embed_condition(batch.cond)
        return (ids, float(batch.cond_noise)) if batch.cond_noise else ids

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``cond``: token ids (B, max_tokens), or (ids, std of the noise on their embedding) as :meth:`embed_batch_condition` gives."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if cond is None:
            cond = self.embed_condition([""] * x_t.shape[0])
        if isinstance(cond, tuple):
            return self.trainable(x_t, t, cond[0], cond[1])
        return self.trainable(x_t, t, cond)

    def drop_captions(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """``batch`` with a ``caption_dropout`` share of its captions replaced by the empty one while training."""
        if not (self.training and self.caption_dropout > 0 and batch.cond is not None):
            return batch
        # Classifier-free guidance training (Ho & Salimans 2022; Stable Diffusion drops 10%).
        drop = torch.rand(len(batch), generator=generator) < self.caption_dropout
        return Batch(batch.images, ["" if d else c for c, d in zip(batch.cond, drop.tolist())], batch.rows, batch.cond_noise)

    def per_example_loss(self, batch: Batch, timesteps: Tensor | None = None, noise: Tensor | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        return super().per_example_loss(self.drop_captions(batch, generator), timesteps, noise, generator)

    def sampling_conditions(self, n: int, cond: Tensor | Sequence[str] | None) -> tuple[Tensor, Tensor]:
        """The conditioning of ``n`` samples (token ids, or an adjusted prompt's hidden states) and the empty caption's in
        the same form, for classifier-free guidance."""
        ids = self.embed_condition(cond if cond is not None else [""] * n)
        empty = self.embed_condition([""] * n)
        if ids is not None and ids.is_floating_point():  # an adjusted prompt embedding: guide against the empty one's
            empty = self.condition_embedding([""] * n)
        assert ids is not None and empty is not None
        return ids, empty

    def guided(self, predict: Callable[[Tensor, Tensor, Tensor], Tensor], ids: Tensor, empty: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """eps(x_t, t) with classifier-free guidance (Ho & Salimans 2022, eq. 6) at ``guidance_scale`` from
        ``predict(x_t, t, conditioning)``; with guidance ``predict`` gets the empty and the given conditioning as one batch."""
        g, n = self.guidance_scale, ids.shape[0]

        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            if g == 1.0:
                return predict(x_t, t, ids)
            both = predict(torch.cat([x_t, x_t]), t.expand(2 * n) if t.ndim == 0 else torch.cat([t, t]), torch.cat([empty, ids]))
            uncond, conditional = both.chunk(2)
            return uncond + g * (conditional - uncond)

        return eps

    @torch.no_grad()
    def sample(self, n: int, solver: str = "ancestral", steps: int = 50, cond: Tensor | Sequence[str] | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self.sample_x0(n, solver, steps, cond, generator))

    @torch.no_grad()
    def sample_x0(self, n: int, solver: str = "ancestral", steps: int = 50, cond: Tensor | Sequence[str] | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
        """What :meth:`sample` decodes: ``n`` guided samples in the noise predictor's space, ``(n, *latent_shape)``."""
        eps = self.guided(self.predict_noise, *self.sampling_conditions(n, cond))
        return reverse_process(eps, self.scheduler, (n, *self.latent_shape), solver, steps, self.device, generator)
