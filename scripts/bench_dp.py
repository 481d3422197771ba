"""Throughput of DP-SGD training vs non-private training on the quickstart UNet, measured in one run.

    python scripts/bench_dp.py                       # configs/model/small.yaml, batch 64, 2 threads
    python scripts/bench_dp.py --model configs/model/tiny.yaml

Each mode runs the step privdiff's trainer runs (zero_grad, mean per-row loss, backward, the
defense's per-image reduction, optimizer step) on a fixed batch:

* ``none``: non-private AdamW.
* ``opacus``: stock Opacus 1.6 (``GradSampleModule`` hooks with the contiguity fix, ``DPOptimizer``),
  what privdiff ran before its own per-example rules.
* ``hooks``: privdiff's default (``defenses/per_sample_grads.py``: convolution rule without im2col
  (the batch as groups of one grouped weight gradient), clipping without copies, backward to the
  layers' inputs only).
* ``functorch``: the same defense with Opacus's vmap per-sample gradients.
* ``ghost``: Opacus's ghost clipping driven by hand (two backward passes); privdiff refuses it
  under Lightning, it is measured here to show what it would be worth.
* ``hooks+canaries``: ``hooks`` with 1000 white-box gradient canaries (the one-run audit's cost on a DP step:
  ``python scripts/bench_dp.py --modes hooks hooks+canaries --repeats 9``).
* ``hooks-free-conv``: NOT a private step, a ceiling: ``hooks`` with every convolution's per-example weight
  gradient handed over as zeros from a buffer kept across steps (the norms, the clipping and the noise still read
  it). What any faster exact convolution rule could at most gain:
  ``python scripts/bench_dp.py --modes none hooks hooks-free-conv --repeats 30 --steps 1``.

The modes are interleaved, in a new random order each repeat; prints the median images/s, the ratio
of the medians to non-private and the median (and quartiles) of each repeat's own ratio to the
non-private step timed beside it, which the machine's slower drifts do not move,
and checks on 8 images that every DP mode computes the same per-image gradient norms and the same
clipped sum of per-image gradients (before noise, half the images clipped) as stock Opacus.
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from privdiff.cli import module_from_config
from privdiff.defenses.dp_sgd import DPSGDDefense
from privdiff.defenses.dp_wrapping import contiguous_inputs
from privdiff.model import Batch, DiffusionModel

REPO = Path(__file__).resolve().parents[1]


def make(config: Path, seed: int = 0) -> DiffusionModel:
    """The model the trainer builds from the ``configs/model/*.yaml`` file ``config``, with the seed's initial weights."""
    torch.manual_seed(seed)
    return module_from_config(config).diffusion


def plain_step(den: DiffusionModel, opt: torch.optim.Optimizer, batch: Batch):
    """One step of zero_grad, mean loss, full backward and optimizer step."""

    def step() -> None:
        opt.zero_grad()
        den.per_example_loss(batch).mean().backward()
        opt.step()

    return step


def contiguous_convolutions(unet: torch.nn.Module) -> None:
    """The contiguity fix stock Opacus needs on a diffusers UNet (see ``contiguous_inputs``)."""
    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(contiguous_inputs)


def step_fn(mode: str, batch: Batch, config: Path, max_grad_norm: float = 1.0, sigma: float = 1.0):
    """Return a function running one training step of ``mode`` and the model it trains."""
    den = make(config)
    if mode == "none":
        return plain_step(den, torch.optim.AdamW(den.trainable.parameters(), lr=1e-4), batch), den
    if mode == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        contiguous_convolutions(den.trainable)
        den.trainable = gsm = GradSampleModule(den.trainable, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.AdamW(gsm.parameters(), lr=1e-4), noise_multiplier=sigma,
            max_grad_norm=max_grad_norm, expected_batch_size=len(batch), loss_reduction="mean",
        )
        den.bench_parts = {"optimizer": opt}
        return plain_step(den, opt, batch), den
    if mode == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping

        contiguous_convolutions(den.trainable)
        den.trainable = gsm = GradSampleModuleFastGradientClipping(den.trainable, max_grad_norm=max_grad_norm, loss_reduction="mean")
        opt = DPOptimizerFastGradientClipping(
            torch.optim.AdamW(gsm.parameters(), lr=1e-4), noise_multiplier=sigma,
            max_grad_norm=max_grad_norm, expected_batch_size=len(batch), loss_reduction="mean",
        )

        def step() -> None:  # what opacus' DPTensorFastGradientClipping.backward does
            opt.zero_grad()
            per_row = den.per_example_loss(batch)
            per_row.mean().backward(retain_graph=True)
            opt.zero_grad()
            coef = gsm.get_clipping_coef()
            gsm.disable_hooks()
            (coef * per_row).sum().backward()
            gsm.enable_hooks()
            opt.step()

        return step, den
    canaries = 1000 if mode.endswith("+canaries") else 0
    rules = mode.removesuffix("+canaries").removesuffix("-free-conv")
    defense = DPSGDDefense(noise_multiplier=sigma, max_grad_norm=max_grad_norm, grad_sample_mode=rules,
                           accountant="rdp", gradient_canaries=canaries)
    defense.on_data_ready(10 * len(batch), len(batch))
    den.trainable = defense.wrap_model(den.trainable)
    if mode.endswith("-free-conv"):
        den.trainable.GRAD_SAMPLERS = {**den.trainable.GRAD_SAMPLERS, torch.nn.Conv2d: ZeroConvolutionWeightRule()}
    opt = defense.wrap_optimizer(torch.optim.AdamW(den.trainable.parameters(), lr=1e-4), den.trainable)
    den.bench_parts = {"optimizer": opt, "defense": defense}

    def step() -> None:  # DiffusionModule's training step, backward and on_before_optimizer_step
        opt.zero_grad()
        den.per_example_loss(batch).mean().backward(inputs=defense.backward_inputs(den.trainable))
        defense.on_before_optimizer_step(den.trainable)
        opt.step()

    return step, den


class ZeroConvolutionWeightRule:
    """A grad-sampler rule for ``Conv2d`` whose per-example weight gradients are zeros from a buffer kept per layer
    and batch size (the bias's are computed): the ``hooks-free-conv`` ceiling, never a private step."""

    accepts_scale = True

    def __init__(self) -> None:
        self.zeros: dict[tuple[torch.nn.Module, int], torch.Tensor] = {}

    def __call__(self, layer: torch.nn.Conv2d, activations, backprops: torch.Tensor, scale: float = 1.0):
        n = backprops.shape[0]
        if (layer, n) not in self.zeros:
            self.zeros[layer, n] = backprops.new_zeros(n, *layer.weight.shape)
        # A new view each step: Opacus marks the tensor it clipped as processed.
        grads = {layer.weight: self.zeros[layer, n].view(n, *layer.weight.shape)}
        if layer.bias is not None:
            grads[layer.bias] = backprops.sum(dim=(2, 3)).mul_(scale)
        return grads


def norms_and_clipped_sum(mode: str, batch: Batch, config: Path, max_grad_norm: float) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Per-image gradient norms and the clipped sum of per-image gradients (before noise) as ``mode``
    computes them on ``batch`` (to check that the modes agree); ghost gives no clipped sum here."""
    _, den = step_fn(mode, batch, config, max_grad_norm=max_grad_norm)
    parts = getattr(den, "bench_parts", {})
    torch.manual_seed(1)
    per_row = den.per_example_loss(batch)
    params = [p for p in den.trainable.parameters() if p.requires_grad]
    defense = parts.get("defense")
    if defense is None:
        per_row.mean().backward()
    else:  # the trainer's path: backward to the layers' inputs, then the per-image reduction
        per_row.mean().backward(inputs=defense.backward_inputs(den.trainable))
        defense.on_before_optimizer_step(den.trainable)
    if mode == "ghost":
        return torch.stack([p._norm_sample for p in params], 1).norm(dim=1), None
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], 1).norm(dim=1)
    parts["optimizer"].clip_and_accumulate()
    return norms, [p.summed_grad.detach().clone() for p in params]


def max_relative_difference(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max |got - ref| / max |ref| over all coordinates of all parameters (a coordinate-wise ratio would divide by
    the exact zeros some parameters have, e.g. the attention key bias, whose gradient vanishes under softmax)."""
    got_flat, ref_flat = torch.cat([g.flatten() for g in got]), torch.cat([r.flatten() for r in ref])
    return ((got_flat - ref_flat).abs().max() / ref_flat.abs().max()).item()


def main(threads: int = 2, model: Path = REPO / "configs/model/small.yaml", batch: int = 64, steps: int = 4,
         repeats: int = 5, modes: Sequence[str] = ("none", "opacus", "hooks", "functorch", "ghost"),
         check_grad_norm: float | None = None, warmup: int = 15) -> None:
    """Time each mode's training step, interleaved; check the per-image gradient norms against stock Opacus.

    Args:
        threads: torch.set_num_threads
        model: a configs/model/*.yaml (the quickstart's)
        batch: the quickstart's data.batch_size
        steps: steps per repeat
        repeats: timed repeats of each mode
        modes: modes to time, among none, opacus, hooks, functorch, ghost, hooks+canaries and hooks-free-conv
        check_grad_norm: the clipping bound of the exactness check; default: the median per-image norm (half clipped)
        warmup: untimed steps of each mode first: the hooks mode's first steps try each convolution rule
            in turn for every layer shape (``FastestConvolutionRule``), a one-time cost of a run
    """
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    images = torch.rand(batch, 1, 16, 16)
    fixed = Batch(images, None, torch.arange(batch))
    rates: dict[str, list[float]] = {}
    step = {mode: step_fn(mode, fixed, model)[0] for mode in modes}
    for _ in range(warmup):
        for mode in modes:
            step[mode]()
    order = random.Random(0)
    for _ in range(repeats):  # interleave the modes, in a new order each repeat, so that drifts hit all alike
        for mode in order.sample(list(modes), len(modes)):
            start = time.perf_counter()
            for _ in range(steps):
                step[mode]()
            rates.setdefault(mode, []).append(batch * steps / (time.perf_counter() - start))
    few = Batch(images[:8], None, torch.arange(8))
    if check_grad_norm is None:  # half the images clipped: both branches of the clipping factor checked
        check_grad_norm = float(norms_and_clipped_sum("opacus", few, model, 1.0)[0].median())
    ref_norms, ref_sum = norms_and_clipped_sum("opacus", few, model, check_grad_norm)
    for mode in (m for m in modes if m not in ("none", "opacus", "hooks-free-conv")):  # free-conv: zeros, not checked
        norms, clipped = norms_and_clipped_sum(mode, few, model, check_grad_norm)
        err = ((norms - ref_norms).abs() / ref_norms).max().item()
        sums = f"{max_relative_difference(clipped, ref_sum):.1e}" if clipped is not None else "n/a"
        print(f"{mode} vs stock opacus, max relative difference: per-image gradient norms {err:.1e}, "
              f"clipped sum of gradients {sums} ({int((ref_norms > check_grad_norm).sum())} of {len(ref_norms)} images clipped)")
    params = sum(p.numel() for p in make(model).trainable.parameters())
    base = statistics.median(rates["none"]) if "none" in rates else None
    print(f"{model.name} UNet ({params / 1e6:.2f}M params), batch {batch} at 16x16, {threads} thread(s), "
          f"median of {repeats} x {steps} steps")
    for mode in modes:
        rate = statistics.median(rates[mode])
        ratio = f"{rate / base:.2f}x" if base else "-"
        spread = f"[{min(rates[mode]):.0f}-{max(rates[mode]):.0f}]"
        paired = ""
        if base and repeats > 1:  # each repeat's ratio to the non-private step timed beside it
            q1, mid, q3 = statistics.quantiles([r / b for r, b in zip(rates[mode], rates["none"])], n=4)
            paired = f", paired by repeat {mid:.2f}x [{q1:.2f}-{q3:.2f}]"
        note = "   (not private: convolution weight rules free)" if mode == "hooks-free-conv" else ""
        print(f"  {mode:15s} {rate:7.1f} img/s {spread:>11s}   {ratio} of non-private{paired}{note}")
    if "hooks" in rates and "hooks+canaries" in rates:
        print(f"  gradient canaries: a DP step takes {statistics.median(rates['hooks']) / statistics.median(rates['hooks+canaries']):.3f}x "
              "the time of one without them")


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
