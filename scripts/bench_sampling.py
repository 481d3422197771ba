"""Benchmark: images/s of privdiff's sampler against diffusers' pipelines on the same model and steps.

Prints, for DDPM-1000, DDIM-50 and DPM-Solver++-20, the images/s of
``privdiff.eval.sampling.generate`` and of ``DDPMPipeline``/``DDIMPipeline`` (diffusers' own loop) on
the quickstart UNet, and their ratio, measured in the same run (median of repeats; the machine is
shared and noisy). Usage: ``python scripts/bench_sampling.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMPipeline, DDPMPipeline, DPMSolverMultistepScheduler

from privdiff.eval.sampling import generate
from privdiff.train.denoiser import Denoiser, build_scheduler, build_unet


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer images and no DDPM-1000")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Denoiser(build_unet(16, 1), build_scheduler()).eval()
    unet, sched = model.unet, model.scheduler
    cases = [("dpmsolver++", 20), ("ddim", 50)] + ([] if args.quick else [("ddpm", 1000)])
    n = args.batch
    print(f"threads={args.threads} batch={n} model=1.1M-param UNet 16x16 (median of {args.repeats})")
    print(f"{'solver':<14}{'privdiff img/s':>16}{'diffusers img/s':>17}{'ratio':>8}")
    for solver, steps in cases:
        repeats = 1 if steps >= 1000 else args.repeats
        ours = _time(lambda: generate(model, n, solver=solver, steps=steps, batch_size=n, progress=False), repeats)
        if solver == "ddpm":
            pipe = DDPMPipeline(unet=unet, scheduler=sched)
            call = lambda: pipe(batch_size=n, num_inference_steps=steps, output_type="np")  # noqa: E731
        elif solver == "ddim":
            pipe = DDIMPipeline(unet=unet, scheduler=sched)
            call = lambda: pipe(batch_size=n, num_inference_steps=steps, output_type="np")  # noqa: E731
        else:
            # diffusers has no DPM-Solver pipeline class for UNet2DModel: DDPMPipeline with the scheduler swapped.
            pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++"))
            call = lambda: pipe(batch_size=n, num_inference_steps=steps, output_type="np")  # noqa: E731
        pipe.set_progress_bar_config(disable=True)
        theirs = _time(call, repeats)
        print(f"{solver + '-' + str(steps):<14}{n / ours:>16.1f}{n / theirs:>17.1f}{theirs / ours:>8.2f}")


if __name__ == "__main__":
    main()
