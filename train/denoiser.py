"""Building blocks of privdiff's diffusion models over diffusers parts: UNets, noise schedules, the reverse process.

The models themselves (``pixel.PixelDiffusion``, ...) implement ``privdiff.model.DiffusionModel``;
this module holds what they share: the training schedule, the sampling schedulers built from it,
and one reverse-process loop, in the spirit of k-diffusion's uniform sampler signature.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from typing import Any, Callable

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from torch import nn

Solver = Literal["ancestral", "ddpm", "ddim", "dpmsolver++"]
SOLVERS: tuple[str, ...] = ("ancestral", "ddpm", "ddim", "dpmsolver++")


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


def make_sampling_scheduler(training: DDPMScheduler, solver: str) -> Any:
    """A fresh diffusers scheduler for ``solver`` built from the training schedule's config."""
    config = training.config
    if solver == "ddpm":
        return DDPMScheduler.from_config(config)
    if solver in ("ddim", "ancestral"):
        return DDIMScheduler.from_config(config)
    if solver == "dpmsolver++":
        # The training schedule's x0 clipping, as DDPM and DDIM inherit it (clip_sample): without it
        # DPM-Solver++ saturated 22-88% of the pixels of the demo's models (design.md); with it
        # still 10-16%, against under 1% for DDIM-50 and DDPM-1000: not the audit's default.
        clip = bool(config.get("clip_sample", False))
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, thresholding=clip,
            sample_max_value=float(config.get("clip_sample_range", 1.0)),
        )
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


@torch.no_grad()
def reverse_process(
    predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    training: DDPMScheduler,
    shape: tuple[int, ...],
    solver: str,
    steps: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``solver`` for ``steps`` steps from Gaussian noise of ``shape``; return x_0 in the model's space.

    ``predict_noise(x_t, t)`` is eps_theta with the conditioning bound. The start noise comes from a
    CPU generator (the same images on any device for the same seed); ancestral solvers draw their
    step noise from it too.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    sched = make_sampling_scheduler(training, solver)
    sched.set_timesteps(min(steps, int(training.config.num_train_timesteps)), device=device)
    x = torch.randn(shape, generator=generator, device="cpu").to(device)
    # "ancestral" is DDIM with eta = 1: DDPM's own generative process on a sub-sequence of the
    # timesteps (Song et al. 2021, Sec. 4.1). Unlike deterministic DDIM and DPM-Solver++ it matches
    # 1000-step DDPM samples of an under-trained (DP-SGD) model (docs/scaling.md, the solver row).
    kwargs = {"ddpm": {"generator": generator}, "ddim": {}, "ancestral": {"generator": generator, "eta": 1.0}}.get(solver, {})
    for t in sched.timesteps:
        x = sched.step(predict_noise(x, t.to(device)), t, x, **kwargs).prev_sample
    return x
