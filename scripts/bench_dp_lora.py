"""Throughput of DP-LoRA steps vs non-private LoRA steps on the same latent text-to-image pipeline, in one run.

    python scripts/bench_dp_lora.py                  # configs/model/t2i_tiny.yaml's pipeline, LoRA rank 8, batch 64
    python scripts/bench_dp_lora.py --rank 4 --batch 32

Both modes run the step privdiff's trainer runs (zero_grad, mean per-example loss, backward, the
defense's per-image reduction, optimizer step) on one fixed batch of images and captions, with the
UNet and the text encoder frozen and only the LoRA adapters trained:

* ``lora``: non-private AdamW on the adapters.
* ``dp_lora``: ``DPSGDDefense`` (Opacus per-example gradients of the adapters only, clipping, noise),
  backward to the layers' inputs only, as ``DiffusionModule.backward`` does.

The modes are interleaved and repeated; prints the median images/s and the ratio (goal >= 0.8x).
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import torch

from privdiff.cli import module_from_config
from privdiff.defenses.dp_sgd import DPSGDDefense
from privdiff.model import Batch, DiffusionModel
from privdiff.train.data import load_builtin

REPO = Path(__file__).resolve().parents[1]


def make(config: Path, rank: int, seed: int = 0) -> DiffusionModel:
    """The config's pipeline, as the trainer builds it, with LoRA adapters of ``rank`` (the base frozen), the seed's weights."""
    torch.manual_seed(seed)
    prefix = "--model.diffusion.init_args."
    return module_from_config(config, 16, 1, f"{prefix}lora_rank={rank}", f"{prefix}train_text_encoder=false", f"{prefix}vae_steps=0").diffusion


def step_fn(mode: str, batch: Batch, config: Path, rank: int):
    model = make(config, rank)
    if mode == "lora":
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad()
            model.per_example_loss(batch).mean().backward()
            opt.step()

        return step
    d = DPSGDDefense(noise_multiplier=1.0, max_grad_norm=1.0)
    d.on_data_ready(1000, len(batch))
    model.trainable = d.wrap_model(model.trainable)
    opt = d.wrap_optimizer(torch.optim.AdamW(model.trainable_parameters(), lr=1e-4), model.trainable)

    def step() -> None:  # DiffusionModule's training step, backward and on_before_optimizer_step
        opt.zero_grad()
        model.per_example_loss(batch).mean().backward(inputs=d.backward_inputs(model.trainable))
        d.on_before_optimizer_step(model.trainable)
        opt.step()

    return step


def main(threads: int = 2, model: Path = REPO / "configs/model/t2i_tiny.yaml", rank: int = 8, batch: int = 64,
         steps: int = 4, repeats: int = 5) -> None:
    """Time LoRA and DP-LoRA steps, interleaved, and print their images/s and ratio.

    Args:
        threads: torch.set_num_threads
        model: a configs/model/*.yaml of a text-to-image model
        rank: LoRA rank (configs/defense/dp_lora.yaml's)
        batch: images (and captions) per step
        steps: steps per repeat
        repeats: timed repeats of each mode
    """
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    pool = load_builtin("captioned_digits", 16, 1)
    fixed = Batch(pool.unit()[:batch], pool.captions[:batch], torch.arange(batch))
    step_of = {mode: step_fn(mode, fixed, model, rank) for mode in ("lora", "dp_lora")}
    for step in step_of.values():
        step()  # warm-up
    rates: dict[str, list[float]] = {mode: [] for mode in step_of}
    for _ in range(repeats):
        for mode, step in step_of.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rates[mode].append(steps * batch / (time.perf_counter() - start))
    adapters = sum(p.numel() for p in make(model, rank).trainable_parameters())
    print(f"LoRA rank {rank} ({adapters} adapter parameters), batch {batch}, {threads} threads, "
          f"{repeats} x {steps} steps interleaved")
    base = statistics.median(rates["lora"])
    for mode, r in rates.items():
        print(f"  {mode:8s} {statistics.median(r):7.1f} images/s  (range {min(r):.1f}-{max(r):.1f})  {statistics.median(r) / base:.2f}x of lora")


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
