"""One prepared check of privdiff's real-size paths on a GPU: throughput, memory and correctness in one table.

    python scripts/gpu_check.py                  # on a GPU machine: real sizes, sized for at most ~8 minutes on one H100
    python scripts/gpu_check.py --cpu-smoke      # anywhere: the same code paths, shrunk, well under a minute

Every model is built from config with random weights (no download, no network):

* ``ddpm``: the CIFAR-10 DDPM UNet (Ho et al. 2020, 35.7M parameters) as ``PixelDiffusion``, trained
  non-privately (bf16 autocast on a GPU) and with ``DPSGDDefense`` (fp32, Poisson batches of expected
  size ``--batch``, noise multiplicity 1), with the step privdiff's trainer runs (``scripts/bench_dp.py``),
  and with DP-SGD under bf16 autocast (``trainer.precision: bf16-mixed``; on the CPU too).
* ``LoRA``: a Stable-Diffusion-1.5-shaped ``UNet2DConditionModel`` (64x64 latents, 77x768 text
  embeddings, both random) with rank-4 LoRA adapters on the attention projections, base frozen,
  trained non-privately and with DP-SGD over the adapters only.
* ``sampler``: ``privdiff.eval.sampling.generate`` (DDIM) against diffusers' ``DDIMPipeline`` on the
  same UNet, start noise and steps; their images must agree.
* ``ddp``: a two-process NCCL all-reduce when two or more GPUs are present.

Correctness: the per-example gradients the DP wrapper computes (before clipping) must match a loop of
single-example backward passes (relative error < 1e-3 in fp32), and no loss or gradient may be NaN/inf.
Prints one table (throughput, ratio, peak memory, ok/FAIL) and exits 1 when any row failed.
"""

from __future__ import annotations

import gc
import math
import resource
import socket
import sys
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import Tensor, nn

from privdiff.defenses.dp_sgd import DPSGDDefense
from privdiff.eval.sampling import generate
from privdiff.model import Batch
from privdiff.train.denoiser import build_scheduler, build_unet
from privdiff.train.pixel import PixelDiffusion

GRAD_TOLERANCE = 1e-3  # relative error of per-example gradients, fp32 without TF32
IMAGE_TOLERANCE = 1e-2  # max |difference| of [0, 1] images between privdiff's and diffusers' DDIM
CIFAR10_PARAMS = 35.7e6  # google/ddpm-cifar10-32's UNet
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # what privdiff's LatentTextToImage adapts


@dataclass(frozen=True)
class Sizes:
    """Everything the real run and the smoke run differ in."""

    image_size: int
    ddpm_channels: tuple[int, ...]
    ddpm_groups: int
    latent_size: int
    sd_channels: tuple[int, ...]
    cross_attention_dim: int
    text_tokens: int
    batch: int  # expected Poisson batch of DP-SGD, and the non-private batch
    lora_batch: int
    steps: int  # timed steps per training check (after one warm-up step)
    sample_images: int
    sample_steps: int
    grad_examples: int  # examples of the per-example gradient check
    train_rows: int  # N of the sample rate q = batch / N (CIFAR-10's training set)


REAL = Sizes(
    image_size=32, ddpm_channels=(128, 256, 256, 256), ddpm_groups=32, latent_size=64, sd_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, text_tokens=77, batch=256, lora_batch=8, steps=5, sample_images=256, sample_steps=50,
    grad_examples=4, train_rows=50_000,
)
SMOKE = Sizes(
    image_size=16, ddpm_channels=(16, 32), ddpm_groups=8, latent_size=8, sd_channels=(32, 64), cross_attention_dim=32,
    text_tokens=77, batch=8, lora_batch=8, steps=2, sample_images=8, sample_steps=4, grad_examples=4, train_rows=80,
)


@dataclass
class Row:
    """One line of the final table."""

    name: str
    throughput: float | None = None  # images/s
    ratio: float | None = None
    memory: str = "-"
    status: str = "ok"  # ok, FAIL or skipped
    detail: str = ""


Step = Callable[[], tuple[int, Tensor]]  # one training step: (images it used, their per-example losses)


# -- measuring ---------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    """Free what the previous check left, so that each check's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    # A CPU has no per-check counter: the whole process's peak resident set so far (Linux: KiB).
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB rss"


def measure(step: Step, steps: int, device: torch.device) -> tuple[float, Tensor]:
    """Images/s over ``steps`` steps after one warm-up step (lazy init, cuDNN heuristics), and all their losses."""
    step()
    synchronize(device)
    start = time.perf_counter()
    images, losses = 0, []
    for _ in range(steps):
        n, loss = step()
        images += n
        losses.append(loss)
    synchronize(device)
    return images / (time.perf_counter() - start), torch.cat(losses)


def ratio(rate: float, baseline: float | None) -> float | None:
    return rate / baseline if baseline else None


def nonfinite(losses: Tensor, params: Sequence[tuple[str, nn.Parameter]]) -> list[str]:
    """Names of what is NaN/inf: the losses, or a parameter's last gradient (the noised one under DP-SGD)."""
    bad = [] if torch.isfinite(losses).all() else ["loss"]
    return bad + [name for name, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]


def autocast(device: torch.device, enabled: bool) -> ContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


@contextmanager
def exact_fp32() -> Iterator[None]:
    """IEEE fp32 matmuls and convolutions for a comparison at 1e-3: TF32 (cuDNN's default for convolutions)
    keeps 10 mantissa bits, which would put rounding errors near the tolerance itself."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


# -- per-example gradients -----------------------------------------------------------------------------
@dataclass
class GradComparison:
    ok: bool
    max_rel_error: float
    message: str


def compare_per_sample_grads(dp: dict[str, Tensor], ref: dict[str, Tensor], tol: float = GRAD_TOLERANCE) -> GradComparison:
    """Compare per-example gradients ``dp[name]`` (N, *shape) with a reference computed one example at a time.

    The error of example i is ||dp_i - ref_i|| / ||ref_i|| over all parameters together: a per-parameter
    ratio would flag parameters whose gradients are near zero, where fp32 rounding dominates.
    """
    if dp.keys() != ref.keys():
        missing = sorted(dp.keys() ^ ref.keys())
        return GradComparison(False, math.inf, f"parameters differ between the two sides: {missing[:3]}")
    shapes = [name for name in dp if dp[name].shape != ref[name].shape]
    if shapes:
        name = shapes[0]
        return GradComparison(False, math.inf, f"{name}: shape {tuple(dp[name].shape)} != {tuple(ref[name].shape)}")
    broken = [name for name, g in dp.items() if not torch.isfinite(g).all()]
    if broken:
        return GradComparison(False, math.inf, f"non-finite per-example gradients in {broken[:3]}")
    diff = torch.zeros(len(next(iter(ref.values()))), dtype=torch.float64)
    norm = torch.zeros_like(diff)
    for name, want in ref.items():
        diff += (dp[name].double() - want.double()).flatten(1).pow(2).sum(1).cpu()
        norm += want.double().flatten(1).pow(2).sum(1).cpu()
    if not (norm > 0).all():
        return GradComparison(False, math.inf, "a reference gradient is exactly zero: the check would prove nothing")
    errors = (diff.sqrt() / norm.sqrt()).tolist()
    worst = max(errors)
    if worst >= tol:
        i = errors.index(worst)
        return GradComparison(False, worst, f"per-example gradient mismatch: example {i} relative error {worst:.2e} >= {tol:g}")
    return GradComparison(True, worst, f"{len(errors)} examples, max relative error {worst:.1e}")


def reference_grads(wrapped: nn.Module, params: dict[str, nn.Parameter], loss_of: Callable[[Tensor], Tensor], n: int) -> dict[str, Tensor]:
    """Each example's gradient from its own forward and backward pass, with Opacus's hooks off."""
    wrapped.disable_hooks()
    try:
        rows = []
        for i in range(n):
            grads = torch.autograd.grad(loss_of(torch.tensor([i])).sum(), list(params.values()), allow_unused=True)
            rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())])
    finally:
        wrapped.enable_hooks()
    return {name: torch.stack([row[j] for row in rows]) for j, name in enumerate(params)}


def dp_per_sample_grads(
    wrapped: nn.Module, defense: DPSGDDefense, opt: torch.optim.Optimizer, loss_of: Callable[[Tensor], Tensor], n: int,
) -> dict[str, Tensor]:
    """The per-example gradients of ``n`` examples as the DP step hands them to the optimizer, before clipping."""
    opt.zero_grad(set_to_none=True)
    loss_of(torch.arange(n)).mean().backward(inputs=defense.backward_inputs(wrapped))
    defense.on_before_optimizer_step(wrapped)
    grads = {name: p.grad_sample.detach().clone() for name, p in wrapped.named_parameters() if p.requires_grad}
    opt.zero_grad(set_to_none=True)  # the next step must not see these per-example gradients
    return grads


def check_per_sample_grads(
    wrapped: nn.Module, defense: DPSGDDefense, opt: torch.optim.Optimizer, loss_of: Callable[[Tensor], Tensor], n: int,
) -> GradComparison:
    """The DP path's per-example gradients of ``n`` examples against a loop of single-example backward passes."""
    params = {name: p for name, p in wrapped.named_parameters() if p.requires_grad}
    with exact_fp32():
        dp = dp_per_sample_grads(wrapped, defense, opt, loss_of, n)
        ref = reference_grads(wrapped, params, loss_of, n)
    return compare_per_sample_grads(dp, ref)


def dp_defense(rows: int, batch: int) -> DPSGDDefense:
    defense = DPSGDDefense(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", noise_multiplicity=1)
    defense.on_data_ready(rows, batch)
    return defense


def dp_step(defense: DPSGDDefense, wrapped: nn.Module, opt: torch.optim.Optimizer, loss: Callable[[], tuple[int, Tensor]]) -> Step:
    """DiffusionModule's DP step (``scripts/bench_dp.py``): backward to layer inputs, per-image reduction, DP optimizer."""

    def step() -> tuple[int, Tensor]:
        opt.zero_grad(set_to_none=True)
        n, per_example = loss()
        per_example.mean().backward(inputs=defense.backward_inputs(wrapped))
        defense.on_before_optimizer_step(wrapped)
        opt.step()
        return n, per_example.detach()

    return step


# -- the CIFAR-10 DDPM ---------------------------------------------------------------------------------
def build_ddpm(sizes: Sizes, device: torch.device, seed: int = 0) -> PixelDiffusion:
    """google/ddpm-cifar10-32's UNet with random weights.

    diffusers' config.json of google/ddpm-cifar10-32 (converted from Ho et al.'s checkpoint): UNet2DModel,
    block_out_channels (128, 256, 256, 256), layers_per_block 2, down blocks (Down, AttnDown, Down, Down),
    i.e. attention at 16x16 only, norm_num_groups 32, norm_eps 1e-6, one 256-channel attention head
    (attention_head_dim null), downsample_padding 0, flip_sin_to_cos false, freq_shift 1: 35.7M
    parameters. ``build_unet`` cannot set norm_eps, downsample_padding, flip_sin_to_cos or freq_shift and
    keeps privdiff's 8-channel heads; none of these changes the parameter count or which per-example
    gradient rules run. (privdiff's own configs/data/cifar10.yaml gets build_unet's 8 norm groups.)
    """
    torch.manual_seed(seed)
    unet = build_unet(
        image_size=sizes.image_size, channels=3, block_out_channels=sizes.ddpm_channels, layers_per_block=2,
        attention_levels=(1,), norm_num_groups=sizes.ddpm_groups,
    )
    return PixelDiffusion.from_parts(unet, build_scheduler()).to(device).train()


def image_batch(n: int, sizes: Sizes, device: torch.device) -> Batch:
    return Batch(torch.rand(n, 3, sizes.image_size, sizes.image_size, device=device), None, torch.arange(n))


def poisson_sizes(rows: int, rate: float, count: int, seed: int = 0) -> list[int]:
    """Batch sizes of ``count`` Poisson batches (each row joins with probability q), as DPDataLoader draws them.

    An empty batch is raised to one image: the UNet cannot run on zero rows (the trainer then skips the
    forward pass), and the check is about the cost of a step.
    """
    draws = torch.binomial(torch.full((count,), float(rows)), torch.full((count,), rate), generator=torch.Generator().manual_seed(seed))
    return [max(1, int(d)) for d in draws]


def ddpm_plain_check(sizes: Sizes, device: torch.device, bf16: bool) -> list[Row]:
    reset_memory(device)
    den = build_ddpm(sizes, device)
    params = sum(p.numel() for p in den.trainable.parameters())
    print(f"ddpm UNet: {params / 1e6:.2f}M parameters (google/ddpm-cifar10-32: {CIFAR10_PARAMS / 1e6:.1f}M)")
    opt = torch.optim.AdamW(den.trainable.parameters(), lr=1e-4)
    batch = image_batch(sizes.batch, sizes, device)

    def plain() -> tuple[int, Tensor]:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            loss = den.per_example_loss(batch)
        loss.mean().backward()
        opt.step()
        return len(batch), loss.detach()

    rate, losses = measure(plain, sizes.steps, device)
    row = Row("ddpm non-private", rate, 1.0, peak_memory(device),
              detail=f"{params / 1e6:.2f}M params, batch {sizes.batch}, {'bf16 autocast' if bf16 else 'fp32'}")
    fail_if_nonfinite(row, losses, list(den.trainable.named_parameters()))
    return [row]


def private_ddpm(sizes: Sizes, device: torch.device) -> tuple[PixelDiffusion, DPSGDDefense, torch.optim.Optimizer]:
    """The DDPM with its UNet wrapped and its optimizer built by ``DPSGDDefense``, as the trainer sets them up."""
    den = build_ddpm(sizes, device)
    defense = dp_defense(sizes.train_rows, sizes.batch)
    den.trainable = defense.wrap_model(den.trainable)
    opt = defense.wrap_optimizer(torch.optim.AdamW(den.trainable.parameters(), lr=1e-4), den.trainable)
    return den, defense, opt


def fixed_ddpm_loss(den: PixelDiffusion, n: int, sizes: Sizes, device: torch.device) -> Callable[[Tensor], Tensor]:
    """Per-example losses of ``n`` fixed examples (images, timesteps, noise), of any subset given by index."""
    fixed = image_batch(n, sizes, device)
    t = torch.randint(0, den.num_train_timesteps, (n,), device=device)
    noise = torch.randn_like(fixed.images)

    def loss_of(idx: Tensor) -> Tensor:
        on_device = idx.to(device)
        rows = Batch(fixed.images[on_device], None, fixed.rows[idx])
        return den.per_example_loss(rows, timesteps=t[on_device], noise=noise[on_device])

    return loss_of


def ddpm_dp_checks(sizes: Sizes, device: torch.device, baseline: float | None) -> list[Row]:
    reset_memory(device)
    den, defense, opt = private_ddpm(sizes, device)
    loss_of = fixed_ddpm_loss(den, sizes.grad_examples, sizes, device)
    grads = check_per_sample_grads(den.trainable, defense, opt, loss_of, sizes.grad_examples)
    grad_row = Row("per-sample gradients (ddpm)", status="ok" if grads.ok else "FAIL", detail=grads.message)
    return [ddpm_dp_row("ddpm DP-SGD", den, defense, opt, sizes, device, baseline, bf16=False), grad_row]


def ddpm_dp_bf16_check(sizes: Sizes, device: torch.device, baseline: float | None) -> list[Row]:
    """DP-SGD as ``trainer.precision: bf16-mixed`` runs it: the forward under bf16 autocast, per-example
    gradients in bf16, norms, clipped sums and noise in float32; its ratio is to the bf16 non-private row."""
    reset_memory(device)
    den, defense, opt = private_ddpm(sizes, device)
    return [ddpm_dp_row("ddpm DP-SGD bf16-mixed", den, defense, opt, sizes, device, baseline, bf16=True, seed=1)]


def ddpm_dp_row(name: str, den: PixelDiffusion, defense: DPSGDDefense, opt: torch.optim.Optimizer, sizes: Sizes,
                device: torch.device, baseline: float | None, bf16: bool, seed: int = 0) -> Row:
    """Throughput and peak memory of the DP step on Poisson batches of expected size ``sizes.batch``."""
    drawn = poisson_sizes(sizes.train_rows, defense.sample_rate, sizes.steps + 1, seed=seed)
    pool = image_batch(max(drawn), sizes, device)
    sizes_left = iter(drawn)

    def poisson_loss() -> tuple[int, Tensor]:
        b = next(sizes_left)
        with autocast(device, bf16):
            per_example = den.per_example_loss(Batch(pool.images[:b], None, pool.rows[:b]))
        return b, per_example.float()

    reset_memory(device)
    rate, losses = measure(dp_step(defense, den.trainable, opt, poisson_loss), sizes.steps, device)
    row = Row(name, rate, ratio(rate, baseline), peak_memory(device),
              detail=f"{'bf16 autocast' if bf16 else 'fp32'}, Poisson batches of mean {sizes.batch} (drew {drawn[1:]}), K=1, sigma=1")
    fail_if_nonfinite(row, losses, list(den.trainable.named_parameters()))
    return row


def fail_if_nonfinite(row: Row, losses: Tensor, params: Sequence[tuple[str, nn.Parameter]]) -> None:
    bad = nonfinite(losses, params)
    if bad:
        row.status = "FAIL"
        row.detail = f"NaN/inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; " + row.detail


# -- Stable-Diffusion-shaped LoRA ------------------------------------------------------------------------
def build_lora_unet(sizes: Sizes, device: torch.device, seed: int = 0) -> nn.Module:
    """SD 1.5's UNet2DConditionModel (random weights) with rank-4 LoRA adapters, the base frozen."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    levels = len(sizes.sd_channels)
    with torch.device(device):  # initialise SD's 860M parameters where they will live, not on the host's cores first
        unet = UNet2DConditionModel(
            sample_size=sizes.latent_size, in_channels=4, out_channels=4, block_out_channels=sizes.sd_channels,
            layers_per_block=2, cross_attention_dim=sizes.cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        )
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, where lora_A's gradients are exactly 0: take a trained-like state
            nn.init.normal_(p, std=1e-2)
    return unet.to(device).train()


@dataclass
class LatentBatch:
    latents: Tensor
    text: Tensor  # random stand-ins for CLIP's 77 x 768 hidden states

    @classmethod
    def random(cls, n: int, sizes: Sizes, device: torch.device) -> "LatentBatch":
        latents = torch.randn(n, 4, sizes.latent_size, sizes.latent_size, device=device)
        return cls(latents, torch.randn(n, sizes.text_tokens, sizes.cross_attention_dim, device=device))


def lora_loss(unet: nn.Module, scheduler: Any, batch: LatentBatch, t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """The DDPM loss per example, as ``DiffusionModel.per_example_loss`` computes it, on given latents and text."""
    n = len(batch.latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=batch.latents.device) if t is None else t
    noise = torch.randn_like(batch.latents) if noise is None else noise
    pred = unet(scheduler.add_noise(batch.latents, noise, t), t, encoder_hidden_states=batch.text).sample
    return (pred.float() - noise.float()).pow(2).flatten(1).mean(1)


def lora_plain_check(sizes: Sizes, device: torch.device, bf16: bool) -> list[Row]:
    reset_memory(device)
    unet, scheduler = build_lora_unet(sizes, device), build_scheduler()
    trainable = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in unet.parameters())
    print(f"SD-shaped UNet: {total / 1e6:.1f}M parameters, {sum(p.numel() for _, p in trainable) / 1e6:.2f}M in LoRA adapters")
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-4)
    batch = LatentBatch.random(sizes.lora_batch, sizes, device)

    def plain() -> tuple[int, Tensor]:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            loss = lora_loss(unet, scheduler, batch)
        loss.mean().backward()
        opt.step()
        return sizes.lora_batch, loss.detach()

    rate, losses = measure(plain, sizes.steps, device)
    row = Row("LoRA", rate, 1.0, peak_memory(device), detail=f"{total / 1e6:.0f}M UNet, r=4, batch {sizes.lora_batch}, "
              f"{'bf16 autocast' if bf16 else 'fp32'}")
    fail_if_nonfinite(row, losses, trainable)
    return [row]


def dp_lora_checks(sizes: Sizes, device: torch.device, baseline: float | None) -> list[Row]:
    reset_memory(device)
    unet, scheduler = build_lora_unet(sizes, device), build_scheduler()
    defense = dp_defense(sizes.train_rows, sizes.lora_batch)
    # The bare UNet2DConditionModel wraps as it is: every layer with trainable parameters (the adapters'
    # Linear layers) returns one tensor; the wrapper returns the UNet's output object unchanged.
    wrapped = defense.wrap_model(unet)
    opt = defense.wrap_optimizer(torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4), wrapped)

    n = sizes.grad_examples
    fixed = LatentBatch.random(n, sizes, device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=device)
    noise = torch.randn_like(fixed.latents)

    def loss_of(idx: Tensor) -> Tensor:
        idx = idx.to(device)
        return lora_loss(wrapped, scheduler, LatentBatch(fixed.latents[idx], fixed.text[idx]), t[idx], noise[idx])

    grads = check_per_sample_grads(wrapped, defense, opt, loss_of, n)
    grad_row = Row("per-sample gradients (DP-LoRA)", status="ok" if grads.ok else "FAIL", detail=grads.message)

    batch = LatentBatch.random(sizes.lora_batch, sizes, device)
    reset_memory(device)
    step = dp_step(defense, wrapped, opt, lambda: (sizes.lora_batch, lora_loss(wrapped, scheduler, batch)))
    rate, losses = measure(step, sizes.steps, device)
    row = Row("DP-LoRA", rate, ratio(rate, baseline), peak_memory(device), detail=f"fp32, batch {sizes.lora_batch}, adapters only")
    fail_if_nonfinite(row, losses, [(name, p) for name, p in wrapped.named_parameters() if p.requires_grad])
    return [row, grad_row]


# -- the audit's sampler against diffusers' pipeline -----------------------------------------------------
def sampler_checks(sizes: Sizes, device: torch.device) -> list[Row]:
    from diffusers import DDIMPipeline, DDIMScheduler

    reset_memory(device)
    den = build_ddpm(sizes, device).eval()
    pipe = DDIMPipeline(unet=den.trainable, scheduler=DDIMScheduler.from_config(den.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    n, steps = sizes.sample_images, sizes.sample_steps

    def ours(k: int, s: int) -> Tensor:
        return generate(den, k, solver="ddim", steps=s, batch_size=k, seed=0, progress=False).images

    def theirs(k: int, s: int) -> Tensor:
        # generate's first batch starts from torch.randn on a CPU generator seeded 0; so does this one.
        return pipe(batch_size=k, generator=torch.Generator().manual_seed(0), num_inference_steps=s, output_type="pt").images.cpu()

    rates = {}
    images = {}
    for name, fn in (("privdiff", ours), ("diffusers", theirs)):
        fn(min(n, 2), 1)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            images[name] = fn(n, steps)
        synchronize(device)
        rates[name] = n / (time.perf_counter() - start)
    memory = peak_memory(device)
    gap = (images["privdiff"] - images["diffusers"]).abs().max().item()
    ok = images["privdiff"].shape == images["diffusers"].shape and gap < IMAGE_TOLERANCE
    base = Row("diffusers DDIMPipeline", rates["diffusers"], 1.0, memory, detail=f"{n} images, {steps} DDIM steps, fp32")
    ours_row = Row("sampler vs diffusers", rates["privdiff"], rates["privdiff"] / rates["diffusers"], memory,
                   status="ok" if ok else "FAIL", detail=f"privdiff generate(solver='ddim'); max |image diff| {gap:.1e}")
    return [base, ours_row]


# -- DDP ------------------------------------------------------------------------------------------------
def _all_reduce_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        x = torch.full((1 << 20,), float(rank + 1), device=f"cuda:{rank}")
        dist.all_reduce(x)
        want = world * (world + 1) / 2
        if not torch.all(x == want):
            raise RuntimeError(f"rank {rank}: all_reduce gave {x[0].item()}, expected {want}")
    finally:
        dist.destroy_process_group()


def ddp_check(device: torch.device) -> list[Row]:
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2:
        return [Row("ddp all-reduce (nccl)", status="skipped", detail=f"skipped ({count} GPU)")]
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    mp.spawn(_all_reduce_worker, args=(2, port), nprocs=2, join=True)
    return [Row("ddp all-reduce (nccl)", detail=f"2 processes, sum checked, {time.perf_counter() - start:.1f} s with start-up")]


# -- the table ------------------------------------------------------------------------------------------
def run_check(names: Sequence[str], check: Callable[[], list[Row]]) -> list[Row]:
    """Run one check; an exception (an out-of-memory error, a shape mismatch) fails its rows, not the script."""
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - every failure belongs in the table
        traceback.print_exc()
        return [Row(name, status="FAIL", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
                for name in names]


def format_table(rows: Sequence[Row]) -> str:
    header = ("check", "images/s", "ratio", "peak memory", "status", "detail")
    cells = [header] + [
        (r.name, "-" if r.throughput is None else f"{r.throughput:.1f}", "-" if r.ratio is None else f"{r.ratio:.2f}x",
         r.memory, r.status, r.detail)
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1] for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run_all(sizes: Sizes, device: torch.device, bf16: bool) -> list[Row]:
    """Every check in turn; a private check's ratio is to the non-private row before it (none if that failed)."""
    ddpm = run_check(["ddpm non-private"], lambda: ddpm_plain_check(sizes, device, bf16))
    ddpm_dp = run_check(["ddpm DP-SGD", "per-sample gradients (ddpm)"], lambda: ddpm_dp_checks(sizes, device, ddpm[0].throughput))
    # against the bf16 non-private row only where that row ran in bf16
    ddpm_dp_bf16 = run_check(["ddpm DP-SGD bf16-mixed"],
                             lambda: ddpm_dp_bf16_check(sizes, device, ddpm[0].throughput if bf16 else None))
    lora = run_check(["LoRA"], lambda: lora_plain_check(sizes, device, bf16))
    lora_dp = run_check(["DP-LoRA", "per-sample gradients (DP-LoRA)"], lambda: dp_lora_checks(sizes, device, lora[0].throughput))
    sampler = run_check(["diffusers DDIMPipeline", "sampler vs diffusers"], lambda: sampler_checks(sizes, device))
    return [*ddpm, *ddpm_dp, *ddpm_dp_bf16, *lora, *lora_dp, *sampler, *run_check(["ddp all-reduce (nccl)"], lambda: ddp_check(device))]


def main(cpu_smoke: bool = False, device: str | None = None, steps: int | None = None, batch: int | None = None,
         lora_batch: int | None = None) -> int:
    """Run every check and print the table; returns the exit status (1 when any row failed, else 0).

    Args:
        cpu_smoke: tiny models on the CPU: the same code paths in seconds
        device: default: cuda when present (cpu with --cpu-smoke)
        steps: timed steps per training check
        batch: expected DP-SGD (Poisson) batch of the DDPM, and its non-private batch
        lora_batch: batch of the LoRA checks
    """
    warnings.filterwarnings("ignore")
    sizes = SMOKE if cpu_smoke else REAL
    overrides = {"steps": steps, "batch": batch, "lora_batch": lora_batch}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() and not cpu_smoke else "cpu"))
    if cpu_smoke:
        # It checks code paths, not speed; on two CPU cores shared with another job, OpenMP threads waiting
        # for each other made it ten times slower (measured: 43 s of checks with 2 threads, 5 s with one).
        torch.set_num_threads(1)
    bf16 = torch_device.type == "cuda"  # the non-private baselines as a GPU run trains them; DP-SGD is fp32 regardless
    print(f"gpu_check on {torch.cuda.get_device_name(torch_device) if torch_device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {'smoke sizes' if cpu_smoke else 'real sizes'}")
    start = time.perf_counter()
    rows = run_all(sizes, torch_device, bf16)
    print(f"\nratio: images/s over the non-private row above it (the diffusers pipeline's for the sampler); "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print(format_table(rows))
    failed = [r for r in rows if r.status == "FAIL"]
    for r in failed:
        print(f"gpu_check: FAIL: {r.name}: {r.detail}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    sys.exit(run_main(main, __doc__))
