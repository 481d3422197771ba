"""Preparation stages: the short, seeded fits a run makes before (or beside) its diffusion training.

A latent model's autoencoder (:class:`AutoencoderFit`), the non-private pretraining of its base on
public images (:class:`PublicPretraining`) and the FID feature classifier (:class:`ClassifierFit`)
are each a small ``LightningModule``: the part it trains, its loss and its optimizer. One runner,
:func:`run_preparation`, fits any of them with a ``lightning.Trainer`` set up for a stage inside a
run (the device the module is on, no logger, no checkpoints, ``max_steps``), and one cache,
:class:`CachedFit`, keeps what they fit by content, so that runs of the same data and settings fit
it once.

A stage's batches carry every random draw it makes (rows, noise, timesteps, dropped captions),
drawn by :class:`SeededBatches` from one seeded generator in the order the step consumes them: a
stage depends on its seed only, Lightning fetching a batch ahead changes no number, and the global
random state of the run around it is left as it was.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.nn import functional as F

from privdiff.files import write_safetensors_atomic

__all__ = ["AutoencoderFit", "CachedFit", "ClassifierFit", "PublicPretraining", "SeededBatches", "run_preparation"]


# -- batches, the runner, the cache ------------------------------------------------------------------
class SeededBatches:
    """``length`` batches that ``batches(generator)`` draws, from a copy of ``generator`` as it is now.

    Each iteration starts again from that state, so an iteration repeats exactly whoever iterates. Lightning
    takes it as it is (any iterable with a length is a training loader): no ``DataLoader`` collates or reseeds it.
    """

    def __init__(self, batches: Callable[[torch.Generator], Iterator[Any]], length: int, generator: torch.Generator) -> None:
        self.batches, self.length, self.state = batches, int(length), generator.get_state()

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        g = torch.Generator()
        g.set_state(self.state)
        return self.batches(g)


def run_preparation(module: pl.LightningModule, batches: SeededBatches, progress: bool = False) -> pl.LightningModule:
    """Fit ``module`` on ``batches`` (one optimizer step each) with a ``lightning.Trainer``; return the module.

    The trainer runs on the device the module is on (a stage of a running fit stays on the fit's
    device), with no logger, no checkpoints, no sanity check, and a progress bar only if asked.
    The stage is seeded by its batches alone (``deterministic`` is not set: it would change the
    torch flags of the run around it). Afterwards the module is where it was (Lightning's teardown
    moves it to the CPU), every submodule in its former train/eval mode, every parameter frozen or
    not and with the gradient it had before (not the stage's last one), and the global random state
    untouched. A stage of no steps does nothing.
    """
    if len(batches) == 0:
        return module
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    cuda = device.type == "cuda"
    found = [(p.requires_grad, p.grad) for p in params], [m.training for m in module.modules()]
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    try:
        lightning_log.setLevel(logging.WARNING)  # its notes on devices, loggers and "max_steps reached", once per stage
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[device.index or 0] if cuda else []):
            # Lightning's hints for a user's own training (few loader workers, a GPU left unused, frozen modules in
            # eval mode) describe choices a stage makes on purpose.
            warnings.simplefilter("ignore", PossibleUserWarning)
            trainer = pl.Trainer(
                accelerator="gpu" if cuda else device.type, devices=[device.index or 0] if cuda else 1, max_steps=len(batches),
                max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=progress, num_sanity_val_steps=0, limit_val_batches=0,
            )
            trainer.fit(module, batches)
    finally:
        lightning_log.setLevel(level)
        module.to(device)
        for p, (requires_grad, grad) in zip(params, found[0]):
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in zip(module.modules(), found[1]):
            m.training = training
    return module


@dataclass(frozen=True)
class CachedFit:
    """What a stage fitted, kept by content: one safetensors file named by the hash of all that determined it.

    Several processes may fit the same entry at once (a comparison's settings side by side): each
    writes its own temporary file and renames it onto the entry (:func:`privdiff.files.write_safetensors_atomic`).
    """

    path: Path

    @classmethod
    def keyed(cls, folder: str | Path, *content: str | bytes | Tensor) -> "CachedFit":
        """The entry in ``folder`` for ``content``: strings (settings, names), bytes and tensors, hashed in order (SHA-256)."""
        digest = hashlib.sha256()
        for part in content:
            if isinstance(part, Tensor):
                part = part.detach().cpu().contiguous().numpy().tobytes()
            digest.update(part.encode() if isinstance(part, str) else part)
        return cls(Path(folder) / f"{digest.hexdigest()[:32]}.safetensors")

    def load(self) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """(tensors, metadata) of the entry, or None when nothing was kept yet."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})

    def save(self, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        write_safetensors_atomic(self.path, tensors, metadata)


# -- the stages --------------------------------------------------------------------------------------
class AutoencoderFit(pl.LightningModule):
    """Fit a diffusers ``AutoencoderKL`` to reconstruct images, with Adam: squared error of the decoding of a posterior
    sample plus ``kl_weight`` times its KL divergence from N(0, I) (the KL-regularised autoencoder of Rombach et al.
    2022, section 3, without its perceptual and adversarial terms)."""

    def __init__(self, vae: nn.Module, lr: float, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.vae, self.lr, self.kl_weight = vae, float(lr), float(kl_weight)
        self.final_loss = float("nan")

    def batches(self, images: Tensor, steps: int, batch_size: int, generator: torch.Generator) -> SeededBatches:
        """``steps`` batches of ``batch_size`` rows of ``images`` in [0, 1] drawn with replacement, each with the noise of its posterior sample."""
        b = min(batch_size, len(images))
        config = self.vae.config
        size = [s // 2 ** (len(config.block_out_channels) - 1) for s in images.shape[2:]]

        def draw(g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
            for _ in range(steps):
                yield images[torch.randint(0, len(images), (b,), generator=g)], torch.randn((b, config.latent_channels, *size), generator=g)

        return SeededBatches(draw, steps, generator)

    def on_fit_start(self) -> None:
        self.vae.train().requires_grad_(True)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, noise = batch
        x = images * 2 - 1
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise
        loss = (self.vae.decode(z).sample - x).pow(2).mean() + self.kl_weight * posterior.kl().mean()
        self.final_loss = loss.detach()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.vae.parameters(), lr=self.lr)


class PublicPretraining(pl.LightningModule):
    """Non-private pretraining of a latent text-to-image model's base (its UNet and text encoder, not LoRA adapters
    nor the position embeddings) on public captioned images: epsilon prediction (Ho et al. 2020, eq. 14), AdamW.

    ``net(x_t, t, token_ids)`` predicts the noise; ``encode`` (pixels in [0, 1] -> latents), ``add_noise``
    (x0, noise, t -> x_t) and ``tokenize`` (captions -> token ids) are the pipeline's, and train nothing.
    """

    def __init__(self, net: nn.Module, lr: float, encode: Callable[[Tensor], Tensor],
                 add_noise: Callable[[Tensor, Tensor, Tensor], Tensor], tokenize: Callable[[list[str]], Tensor]) -> None:
        super().__init__()
        self.net, self.lr = net, float(lr)
        self.encode, self.add_noise, self.tokenize = encode, add_noise, tokenize
        self.base = [p for name, p in net.named_parameters() if "lora_" not in name and "position_embedding" not in name]
        self.final_loss = float("nan")

    @staticmethod
    def batches(images: Tensor, captions: Sequence[str], steps: int, batch_size: int, caption_dropout: float,
                timesteps: int, latent_shape: Sequence[int], generator: torch.Generator) -> SeededBatches:
        """``steps`` batches of ``batch_size`` rows drawn with replacement: images, captions (each replaced by the empty
        one with probability ``caption_dropout``, for classifier-free guidance), timesteps and noise."""
        b = min(batch_size, len(images))

        def draw(g: torch.Generator) -> Iterator[tuple[Tensor, list[str], Tensor, Tensor]]:
            for _ in range(steps):
                rows = torch.randint(0, len(images), (b,), generator=g)
                caps = ["" if float(torch.rand(1, generator=g)) < caption_dropout else captions[i] for i in rows.tolist()]
                t = torch.randint(0, timesteps, (b,), generator=g)
                yield images[rows], caps, t, torch.randn((b, *latent_shape), generator=g)

        return SeededBatches(draw, steps, generator)

    def on_fit_start(self) -> None:
        # Only the base trains: adapters stay as they are (a DP defense's per-example hooks on them stay idle).
        self.net.requires_grad_(False).train()
        for p in self.base:
            p.requires_grad_(True)

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        images, captions, t, noise = batch
        x0 = self.encode(images)
        loss = (self.net(self.add_noise(x0, noise, t), t, self.tokenize(list(captions))) - noise).pow(2).mean()
        self.final_loss = loss.detach()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.base, lr=self.lr)


class ClassifierFit(pl.LightningModule):
    """Fit a classifier (images -> logits) with cross-entropy and Adam, over epochs of seeded permutations."""

    def __init__(self, classifier: nn.Module, lr: float) -> None:
        super().__init__()
        self.classifier, self.lr = classifier, float(lr)

    @staticmethod
    def batches(images: Tensor, labels: Tensor, epochs: int, batch_size: int, generator: torch.Generator) -> SeededBatches:
        """``epochs`` passes over (images, labels), each in a new random order, in batches of ``batch_size`` (the last one shorter)."""
        n = len(images)

        def draw(g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
            for _ in range(epochs):
                order = torch.randperm(n, generator=g)
                for i in range(0, n, batch_size):
                    yield images[order[i : i + batch_size]], labels[order[i : i + batch_size]]

        return SeededBatches(draw, epochs * -(-n // batch_size), generator)

    def on_fit_start(self) -> None:
        self.classifier.train()

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self.classifier(images.to(torch.float32)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.classifier.parameters(), lr=self.lr)
