"""The one interface every stage uses to talk to a diffusion model, and the batch it trains on.

Training (``privdiff.train``), the defenses and the audit (``privdiff.eval``) see a diffusion model
only through :class:`DiffusionModel`, never through a concrete diffusers class: the trainable
module (what DP-SGD wraps, EMA tracks and the optimizer steps), the per-example loss of a batch,
the noise prediction at (x_t, t, conditioning), the noise schedule, encode/decode between pixels
in [0, 1] and the model's space, sampling, and save/load as a folder diffusers loads. Pixel and
latent (text-to-image) models are implementations of it in ``privdiff.train``.

Distances and thresholds are always computed on decoded pixels in [0, 1]; the attacks that query
the noise predictor (membership inference) work in the model's space, reached with :meth:`encode`.

:class:`GenerativeModel` is the part of the interface a model without a noise predictor (a GAN,
``privdiff.train.gan``) also has: what it is, encode/decode, sampling, save/load, the trainable
module. Capability flags (``has_noise_predictor``, ``has_discriminator``) tell the audit which
attacks apply, so that no stage names a concrete model class. A model that trains in its own way
(several optimizers, as a GAN's generator and discriminator) sets ``owns_training`` and provides
:meth:`GenerativeModel.configure_optimizers` and :meth:`GenerativeModel.training_step`; the one
LightningModule (``privdiff.train.module.DiffusionModule``) then runs it with manual optimization.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Batch", "DiffusionModel", "GenerativeModel"]


@dataclass
class Batch:
    """What a training step sees: images in [0, 1], an optional conditioning, and the table rows they came from.

    ``cond`` is what the model is conditioned on, in the form the data provide it: class labels
    (int64, -1 = none), captions (a list of strings), or None for an unconditional model.
    ``cond_noise`` is the standard deviation of Gaussian noise a text model adds to its caption
    embedding in this step (a training-side caption defense sets it; 0 = none).
    """

    images: Tensor
    cond: Tensor | list[str] | None
    rows: Tensor
    cond_noise: float = 0.0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def of(cls, loaded: Any) -> "Batch":
        """A ``Batch`` from what a data loader yields: a ``Batch``, or the ``(images, cond, rows)`` triple
        that the default collate and Opacus's collate of an empty Poisson batch produce."""
        if isinstance(loaded, Batch):
            return loaded
        images, cond, rows = loaded
        if isinstance(cond, Tensor) and cond.dtype.is_floating_point:  # Opacus's empty batch: zeros of float type
            cond = cond.long()
        return cls(images, cond, rows.long() if isinstance(rows, Tensor) else torch.as_tensor(rows))

    def repeat_interleave(self, k: int) -> "Batch":
        """Each example ``k`` times in a row (rows ``[i*k:(i+1)*k]`` are example i), for noise multiplicity."""
        cond = self.cond
        if isinstance(cond, Tensor):
            cond = cond.repeat_interleave(k, 0)
        elif cond is not None:
            cond = [c for c in cond for _ in range(k)]
        return Batch(self.images.repeat_interleave(k, 0), cond, self.rows.repeat_interleave(k, 0), self.cond_noise)

    def to(self, device: torch.device | str) -> "Batch":
        cond = self.cond.to(device) if isinstance(self.cond, Tensor) else self.cond
        return Batch(self.images.to(device), cond, self.rows.to(device), self.cond_noise)


class GenerativeModel(nn.Module, ABC):
    """An image generator as the audit and the training module see it, whether or not it has a noise predictor.

    Subclasses set ``self.trainable`` (the module whose parameters training updates, EMA tracks and
    the export writes; a defense may replace it by a wrapper, e.g. Opacus's ``GradSampleModule``,
    and the model must then call that wrapper) and implement the abstract methods.
    """

    trainable: nn.Module
    # what the audit may query: the noise predictor (loss/PIA/SecMI membership inference, the solver check, the
    # canaries' loss scores) and a discriminator's score (LOGAN); attacks that need one say "n/a" without it
    has_noise_predictor: ClassVar[bool] = False
    has_discriminator: ClassVar[bool] = False
    # True: the model trains itself (configure_optimizers + training_step) under Lightning's manual optimization
    owns_training: ClassVar[bool] = False

    # -- what it is -------------------------------------------------------------------------
    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the pixel images it is trained on and generates."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one x0 the noise predictor works on, what :meth:`encode` gives per image (a pixel model's: the image's)."""
        return self.image_shape

    @property
    def conditioning(self) -> str | None:
        """What it is conditioned on: ``None``, ``"class"`` (int64 labels) or ``"text"`` (captions)."""
        return None

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a class-conditional model, else None."""
        return None

    @property
    def calls_per_sampling_step(self) -> int:
        """Noise-predictor calls per image per sampling step (2 with classifier-free guidance), for attack costs."""
        return 1

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def prepare(self, public: Any, members: Any) -> dict[str, Any] | None:
        """Fit what the model needs from data before training starts (a latent model's autoencoder).

        ``public`` holds images of the source that are neither members nor held out (an
        ``ImageTable`` or None), ``members`` the training images. Returns a record for the report,
        or None (the default: nothing to fit).
        """
        return None

    def summary(self) -> dict[str, Any]:
        """Facts about the model for the report (kind, adapters, an autoencoder's reconstruction error)."""
        return {"kind": type(self).__name__}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters training updates (``trainable``'s that require gradients), in a fixed order."""
        return [p for p in self.trainable.parameters() if p.requires_grad]

    # -- between pixels and the model's space -----------------------------------------------
    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Pixels in [0, 1] (N, C, H, W) -> the model's x0 (identity up to scale for pixel models, the VAE for latent ones)."""

    @abstractmethod
    def decode(self, x0: Tensor) -> Tensor:
        """The model's x0 -> pixels in [0, 1]."""

    def embed_condition(self, cond: Tensor | Sequence[str] | None) -> Any:
        """The data's conditioning (``Batch.cond``) -> what :meth:`predict_noise` takes (default: unchanged)."""
        return cond

    def condition_embedding(self, cond: Tensor | Sequence[str] | None) -> Tensor | None:
        """A continuous, differentiable form of the conditioning (a text model: its text encoder's hidden states,
        (B, L, W)) that :meth:`predict_noise` and :meth:`sample` accept in place of ``cond``; None when the model has
        none (the default). Generation-side defenses that move a prompt away from memorization work on it."""
        return None

    def embed_batch_condition(self, batch: Batch) -> Any:
        """A training batch's conditioning for :meth:`predict_noise` (default: ``embed_condition(batch.cond)``;
        a text model also honours ``batch.cond_noise``)."""
        return self.embed_condition(batch.cond)

    # -- generation ---------------------------------------------------------------------------
    @abstractmethod
    def sample(
        self,
        n: int,
        solver: str = "ancestral",
        steps: int = 50,
        cond: Tensor | Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` samples, decoded to pixels in [0, 1], from one reverse-process run (no batching, no defenses); a model
        without a noise predictor ignores ``solver`` and ``steps``.

        Use ``privdiff.eval.sampling.generate``: the one sampling function, with batching and the
        generation-side defenses.
        """

    # -- folders anyone can load --------------------------------------------------------------
    @abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder that :meth:`from_pretrained` loads, safetensors weights (a diffusion model's: the matching
        diffusers pipeline's folder)."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path) -> "GenerativeModel":
        """Load a folder written by :meth:`save_pretrained` (or by the matching diffusers pipeline)."""

    # model_index.json's _class_name of the folders this implementation reads and writes
    pipeline: ClassVar[str | None] = None

    @classmethod
    def is_folder(cls, path: Path) -> bool:
        """Whether ``path`` is a folder of this implementation's pipeline (its model_index.json says so)."""
        index = Path(path) / "model_index.json"
        return cls.pipeline is not None and index.is_file() and json.loads(index.read_text()).get("_class_name") == cls.pipeline

    # -- what sees the training images (what DP-SGD wraps) ---------------------------------------
    @property
    def private_module(self) -> nn.Module:
        """The module whose gradients depend on the training images: what a training-stage defense (DP-SGD) wraps and
        privatises. Default ``trainable``; a GAN's is its discriminator (the generator sees the images only through it,
        so a DP discriminator makes the generator DP by post-processing, Xie et al. 2018)."""
        return self.trainable

    def set_private_module(self, module: nn.Module) -> None:
        """Put ``module`` (a defense's wrapper of :attr:`private_module`) in its place; the model must then call it.
        A method, not a property setter: ``nn.Module.__setattr__`` would register a module under the property's name."""
        self.trainable = module

    def check_private_training(self) -> None:
        """Raise ``ValueError`` when a training-stage defense that wraps :attr:`private_module` cannot honour how this
        model trains it (a model that ``owns_training`` must step the private module's optimizer once per batch)."""

    # -- a model that trains itself (``owns_training``) ------------------------------------------
    def discriminator_score(self, images: Tensor) -> Tensor:
        """(N,) the discriminator's realness logit of pixels in [0, 1] (models with ``has_discriminator``)."""
        raise NotImplementedError(f"{type(self).__name__} has no discriminator")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers of a model that ``owns_training``, in the order :meth:`training_step` steps them (the last
        one's step counts one training step)."""
        raise NotImplementedError(f"{type(self).__name__} trains through the module's loss (owns_training is False)")

    def training_step(self, batch: Batch, optimizers: Sequence[Any], backward: Callable[[Tensor], None]) -> dict[str, Tensor]:
        """One training step of a model that ``owns_training``: zero, ``backward(loss)`` and step each optimizer
        (as :meth:`configure_optimizers` returned them); return the losses to log by name."""
        raise NotImplementedError(f"{type(self).__name__} trains through the module's loss (owns_training is False)")


class DiffusionModel(GenerativeModel):
    """A diffusion model (epsilon prediction, DDPM training schedule) as every stage of privdiff sees it.

    Besides ``self.trainable``, subclasses set ``self.scheduler`` (a diffusers ``DDPMScheduler``
    holding the training noise schedule) and implement the abstract methods.
    """

    scheduler: Any
    has_noise_predictor: ClassVar[bool] = True

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def alphas_cumprod(self) -> Tensor:
        """abar_t of the training schedule (float32, on the model's device), for attacks that invert steps."""
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    # -- the model --------------------------------------------------------------------------
    @abstractmethod
    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """eps_theta(x_t, t, cond); ``cond`` as :meth:`embed_condition` returns it; ``t`` int64 (N,) or scalar."""

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4), by the scheduler itself."""
        t = t.to(x0.device).long()
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        return self.scheduler.add_noise(x0, noise, t)

    def per_example_loss(
        self,
        batch: Batch,
        timesteps: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The simple DDPM loss ||eps - eps_theta(x_t, t)||^2 averaged per example, shape (B,) (Ho et al. 2020, eq. 14).

        Random ``timesteps`` and ``noise`` are drawn when not given.
        """
        x0 = self.encode(batch.images.to(self.device))
        b = x0.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (b,), device=x0.device, generator=generator)
        elif timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        timesteps = timesteps.to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        noise = noise.to(x0.device)
        pred = self.predict_noise(self.add_noise(x0, noise, timesteps), timesteps, self.embed_batch_condition(batch))
        return (pred.float() - noise.float()).pow(2).flatten(1).mean(1)
