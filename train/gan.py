"""A GAN baseline: a DCGAN generator and discriminator (Radford et al. 2016) for small grayscale or colour images.

One implementation of ``privdiff.model.GenerativeModel`` without a noise predictor: it trains itself
(``owns_training``: the non-saturating GAN loss of Goodfellow et al. 2014, sec. 3, with Adam(2e-4, (0.5, 0.999)) as
DCGAN does), samples from a latent z, and exposes its discriminator for LOGAN's membership attack (Hayes et al.
2019). The discriminator is its ``private_module``: DP-SGD on it makes the generator DP by post-processing (DP-GAN,
Xie et al. 2018). ``encode``/``decode`` are the identity on [0, 1] so that the audit's signals (round trips, copy distances)
work unchanged. The generator is ``trainable``: the EMA of ``privdiff.train.module.DiffusionModule`` tracks it and
the export writes its EMA weights beside the discriminator's.

Its folder is NOT a diffusers pipeline: ``config.json`` (``_class_name`` ``PrivdiffDCGAN``) and
``generator.safetensors`` / ``discriminator.safetensors``, read back by :meth:`DCGAN.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privdiff.model import Batch, GenerativeModel

from .denoiser import unwrap

CLASS_NAME = "PrivdiffDCGAN"  # config.json's _class_name of the folders this model reads and writes


def _upsamplings(image_size: int) -> int:
    """How many stride-2 layers take a 4x4 map to ``image_size`` (which must be 4 * 2^k, k >= 1)."""
    k, size = 0, 4
    while size < image_size:
        size, k = size * 2, k + 1
    if size != image_size or k < 1:
        raise ValueError(f"the DCGAN needs image_size = 4 * 2^k (8, 16, 32, ...), got {image_size}")
    return k


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, C, H, W) in [0, 1]: a linear map to 4x4, then stride-2 transposed convolutions
    with batch norm and ReLU (DCGAN), a sigmoid at the end."""

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int) -> None:
        super().__init__()
        k = _upsamplings(image_size)
        widths = [width * 2 ** (k - 1 - i) for i in range(k)]  # halving towards the image, DCGAN's pyramid
        self.project = nn.Sequential(nn.Linear(latent_dim, widths[0] * 16, bias=False), nn.BatchNorm1d(widths[0] * 16), nn.ReLU())
        layers: list[nn.Module] = []
        for i in range(k - 1):
            layers += [nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)
        self.first_width = widths[0]

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(z.shape[0], self.first_width, 4, 4))


class Discriminator(nn.Module):
    """Images in [0, 1] -> (N,) realness logits: stride-2 convolutions with leaky ReLU (DCGAN) down to 4x4, then linear.

    No batch norm: a per-example logit is what LOGAN scores, and per-sample gradients (DP-SGD) need layers that
    do not mix the examples of a batch.
    """

    def __init__(self, image_size: int, channels: int, width: int) -> None:
        super().__init__()
        k = _upsamplings(image_size)
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(k):
            c_out = width * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 16, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images * 2 - 1).squeeze(1)


class DCGAN(GenerativeModel):
    """A DCGAN (Radford et al. 2016) trained with the non-saturating loss (Goodfellow et al. 2014).

    Args:
        image_size, channels: the images (linked from the data module by ``privdiff fit``); image_size = 4 * 2^k.
        latent_dim: size of z ~ N(0, I).
        width: channels of the generator's last and the discriminator's first layer (doubling per resolution).
        lr, betas: Adam for both networks (DCGAN: 2e-4, (0.5, 0.999)).
        d_steps: discriminator updates per generator update.
        fake_batch: generated images per discriminator and generator update; None: as many as the batch's real
            images. A private discriminator (DP-SGD) needs a number: the Poisson batch's size is private, and each
            fake image's clipped gradient would otherwise move with it.
    """

    owns_training = True
    has_discriminator = True

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        latent_dim: int = 64,
        width: int = 64,
        lr: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.999),
        d_steps: int = 1,
        fake_batch: int | None = None,
    ) -> None:
        super().__init__()
        if fake_batch is not None and fake_batch < 1:
            raise ValueError(f"DCGAN fake_batch must be >= 1 (or null), got {fake_batch}")
        if latent_dim < 1 or width < 1 or lr <= 0 or d_steps < 1 or len(betas) != 2:
            raise ValueError(f"DCGAN needs latent_dim, width, d_steps >= 1, lr > 0 and two betas, got {latent_dim}, "
                             f"{width}, {d_steps}, {lr}, {list(betas)}")
        self.config = {"image_size": image_size, "channels": channels, "latent_dim": latent_dim, "width": width,
                       "lr": lr, "betas": [float(b) for b in betas], "d_steps": d_steps, "fake_batch": fake_batch}
        self.trainable = Generator(image_size, channels, latent_dim, width)
        self.discriminator = Discriminator(image_size, channels, width)

    # -- what it is -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.config["image_size"]
        return (self.config["channels"], size, size)

    def summary(self) -> dict[str, Any]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"kind": "gan", "architecture": "DCGAN", "latent_dim": self.config["latent_dim"],
                "generator_parameters": count(unwrap(self.trainable)), "discriminator_parameters": count(self.discriminator),
                "diffusers_pipeline": False}

    # -- between pixels and the model's space: the model works on pixels in [0, 1] ----------
    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, x0: Tensor) -> Tensor:
        return x0.clamp(0, 1)

    def discriminator_score(self, images: Tensor) -> Tensor:
        """(N,) the discriminator's logit D(x) of pixels in [0, 1]: LOGAN's white-box membership score."""
        return self.discriminator(images.to(self.device))

    # -- training -----------------------------------------------------------------------------
    @property
    def private_module(self) -> nn.Module:
        """The discriminator: the only network that sees the training images (DP-SGD wraps it; Xie et al. 2018)."""
        return self.discriminator

    def set_private_module(self, module: nn.Module) -> None:
        self.discriminator = module

    def check_private_training(self) -> None:
        if self.config["d_steps"] != 1:
            raise ValueError(f"a private discriminator needs d_steps = 1, got {self.config['d_steps']}: each further "
                             "discriminator step would reuse the step's Poisson batch, which the accountant does not count")
        if self.config["fake_batch"] is None:
            raise ValueError("a private discriminator needs a fixed model.diffusion.init_args.fake_batch (e.g. the data's "
                             "batch_size): the Poisson batch's size is private, and the number of fakes would follow it")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam for the discriminator, then the generator (the generator's step ends a training step)."""
        lr, betas = self.config["lr"], tuple(self.config["betas"])
        return [torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas),
                torch.optim.Adam(self.trainable_parameters(), lr=lr, betas=betas)]

    def latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, I), (n, latent_dim), drawn on the CPU (the same z for a seed whatever the device)."""
        return torch.randn(n, self.config["latent_dim"], generator=generator).to(self.device)

    def training_step(self, batch: Batch, optimizers: Sequence[Any], backward: Callable[[Tensor], None]) -> dict[str, Tensor]:
        """``d_steps`` discriminator updates on log(1 + e^-D(x)) + log(1 + e^D(G(z))), then one generator update on
        log(1 + e^-D(G(z))) (the non-saturating loss, Goodfellow et al. 2014, sec. 3)."""
        d_opt, g_opt = optimizers
        real = batch.images.to(self.device)
        n = real.shape[0]
        fakes = self.config["fake_batch"] or n
        for _ in range(self.config["d_steps"]):
            fake = self.trainable(self.latents(fakes)).detach()
            # one forward of real and fake together: a per-example-gradient wrapper (DP-SGD) takes one forward per
            # backward; the discriminator has no batch norm, so the logits are those of two separate calls
            logits = self.discriminator(torch.cat([real, fake]))
            d_loss = F.softplus(-logits[:n]).mean() + F.softplus(logits[n:]).mean()
            d_opt.zero_grad()
            backward(d_loss)
            d_opt.step()
        # The discriminator's parameters are frozen while the generator learns through it: no gradient for them, and
        # a per-example-gradient wrapper records nothing (Lightning's toggle_optimizer does the same).
        self.discriminator.requires_grad_(False)
        try:
            g_loss = F.softplus(-self.discriminator(self.trainable(self.latents(fakes)))).mean()
            g_opt.zero_grad()
            backward(g_loss)
            g_opt.step()
        finally:
            self.discriminator.requires_grad_(True)
        return {"d_loss": d_loss, "g_loss": g_loss}

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, solver: str = "ancestral", steps: int = 50, cond: Any = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` images G(z) in [0, 1]; ``solver``, ``steps`` and ``cond`` do not apply to a GAN and are ignored."""
        return self.trainable(self.latents(n, generator)).clamp(0, 1)

    # -- folders ------------------------------------------------------------------------------
    @staticmethod
    def is_folder(path: Path) -> bool:
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == CLASS_NAME

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and the generator's and discriminator's safetensors weights (not a diffusers pipeline)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in unwrap(self.trainable).state_dict().items()},
                  str(path / "generator.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in unwrap(self.discriminator).state_dict().items()},
                  str(path / "discriminator.safetensors"))
        (path / "config.json").write_text(json.dumps({"_class_name": CLASS_NAME, **self.config}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DCGAN":
        """Load a folder written by :meth:`save_pretrained` (safetensors weights only)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not cls.is_folder(path):
            raise ValueError(f"{path} is not a privdiff DCGAN folder: expected config.json with _class_name {CLASS_NAME}")
        config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if not k.startswith("_")}
        model = cls(**config)
        model.trainable.load_state_dict(load_file(str(path / "generator.safetensors")))
        model.discriminator.load_state_dict(load_file(str(path / "discriminator.safetensors")))
        return model.eval()
