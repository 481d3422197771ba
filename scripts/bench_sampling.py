"""Benchmark: images/s of privdiff's sampler against diffusers' pipelines on the same model and steps.

Prints, for DDPM-1000, DDIM-50 and DPM-Solver++-20, the images/s of
``privdiff.eval.sampling.generate`` and of ``DDPMPipeline``/``DDIMPipeline`` (diffusers' own loop) on
the quickstart UNet, and their ratio, measured in the same run (median of interleaved repeats; the
machine is shared and noisy). Usage: ``python scripts/bench_sampling.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDPMPipeline, DPMSolverMultistepScheduler

from privdiff.eval.sampling import generate
from privdiff.cli import module_from_config

REPO = Path(__file__).resolve().parents[1]


def _interleaved(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating them so that the machine's drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="no DDPM-1000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the 20- and 50-step cases (DDPM-1000: 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", type=Path, default=REPO / "configs/model/small.yaml", help="a configs/model/*.yaml (the quickstart's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = module_from_config(args.model).diffusion.eval()
    unet, sched = model.trainable, model.scheduler
    cases = [("dpmsolver++", 20), ("ddim", 50)] + ([] if args.quick else [("ddpm", 1000)])
    n = args.batch
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"threads={args.threads} batch={n} model={args.model.name} ({params:.2f}M-param UNet, 16x16); "
          f"images/s, median [range] of interleaved repeats")
    print(f"{'solver':<16}{'privdiff img/s':>22}{'diffusers img/s':>22}{'ratio':>8}")
    for solver, steps in cases:
        if solver == "ddpm":
            pipe = DDPMPipeline(unet=unet, scheduler=sched)
        elif solver == "ddim":
            pipe = DDIMPipeline(unet=unet, scheduler=sched)
        else:
            # diffusers has no DPM-Solver pipeline class for UNet2DModel: DDPMPipeline with the scheduler swapped.
            pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++"))
        pipe.set_progress_bar_config(disable=True)
        fns = {
            "privdiff": lambda: generate(model, n, solver=solver, steps=steps, batch_size=n, progress=False),
            "diffusers": lambda: pipe(batch_size=n, num_inference_steps=steps, output_type="np"),
        }
        times = _interleaved(fns, 2 if steps >= 1000 else args.repeats)
        rate = {k: sorted(n / t for t in v) for k, v in times.items()}
        cell = {k: f"{statistics.median(v):.1f} [{v[0]:.1f}-{v[-1]:.1f}]" for k, v in rate.items()}
        ratio = statistics.median(rate["privdiff"]) / statistics.median(rate["diffusers"])
        print(f"{solver + '-' + str(steps):<16}{cell['privdiff']:>22}{cell['diffusers']:>22}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
