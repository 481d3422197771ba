"""Benchmark: privdiff's sampler against diffusers' pipelines (speed), and each solver against DDPM-1000 (fit).

Part 1 prints, for DDPM-1000, DDIM-50 and DPM-Solver++-20, the images/s of
``privdiff.eval.sampling.generate`` and of ``DDPMPipeline``/``DDIMPipeline`` (diffusers' own loop) on
the quickstart UNet, and their ratio, measured in the same run (median of interleaved repeats; the
machine is shared and noisy).

Part 2 checks that the audit's solver samples what the model is: on a *trained* model (the
quickstart's, trained here for ``--train-steps`` steps, or ``--model-dir`` a diffusers folder), each
solver's samples against DDPM-1000 ancestral samples of the same weights: the share of pixels at 0
and at 1 (real digits have many black pixels: compare with DDPM-1000's) and the Fréchet distance to
the DDPM-1000 samples in the features of a classifier trained on the digits (0 = the same
distribution; the distance between two DDPM-1000 draws shows the noise floor).
Usage: ``python scripts/bench_sampling.py [--quick] [--threads N] [--model-dir DIR]``.
"""

from __future__ import annotations

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


def main(quick: bool = False, threads: int = 2, repeats: int = 5, batch: int = 64,
         model: Path = REPO / "configs/model/small.yaml", model_dir: Path | None = None, train_steps: int = 500,
         fit_samples: int = 96) -> None:
    """Part 1 (speed against diffusers' pipelines), then part 2 (each solver's fit against DDPM-1000).

    Args:
        quick: no DDPM-1000
        threads: torch CPU threads
        repeats: repeats of the 20- and 50-step cases (DDPM-1000: 2)
        batch: images per call
        model: a configs/model/*.yaml (the quickstart's)
        model_dir: a trained diffusers folder for part 2 (default: train one)
        train_steps: steps of the quickstart model trained for part 2
        fit_samples: samples per solver in part 2
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    diffusion = module_from_config(model).diffusion.eval()
    unet, sched = diffusion.trainable, diffusion.scheduler
    cases = [("dpmsolver++", 20), ("ddim", 50)] + ([] if quick else [("ddpm", 1000)])  # diffusers has pipelines for these
    n = batch
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"threads={threads} batch={n} model={model.name} ({params:.2f}M-param UNet, 16x16); "
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
            "privdiff": lambda: generate(diffusion, n, solver=solver, steps=steps, batch_size=n, progress=False),
            "diffusers": lambda: pipe(batch_size=n, num_inference_steps=steps, output_type="np"),
        }
        times = _interleaved(fns, 2 if steps >= 1000 else repeats)
        rate = {k: sorted(n / t for t in v) for k, v in times.items()}
        cell = {k: f"{statistics.median(v):.1f} [{v[0]:.1f}-{v[-1]:.1f}]" for k, v in rate.items()}
        ratio = statistics.median(rate["privdiff"]) / statistics.median(rate["diffusers"])
        print(f"{solver + '-' + str(steps):<16}{cell['privdiff']:>22}{cell['diffusers']:>22}{ratio:>8.2f}")
    agreement(model, model_dir, train_steps, fit_samples)


def _trained_model(model: Path, model_dir: Path | None, train_steps: int, out: Path):
    from privdiff.cli import run_fit_cli
    from privdiff.train.pixel import PixelDiffusion

    if model_dir is not None:
        return PixelDiffusion.from_pretrained(model_dir)
    run_fit_cli(["fit", "-c", str(REPO / "configs/base.yaml"), "-c", str(REPO / "configs/data/digits.yaml"), "-c", str(model),
                 "--trainer.max_steps", str(train_steps), "--trainer.enable_progress_bar", "false", "--audit", "null",
                 "--run_dir", str(out)])
    return PixelDiffusion.from_pretrained(out / "model")


def agreement(model: Path, model_dir: Path | None, train_steps: int, fit_samples: int) -> None:
    """Part 2: each solver's samples against DDPM-1000 ancestral samples of the same trained weights (``model_dir``'s,
    or the ``model`` config's trained here for ``train_steps``), ``fit_samples`` each."""
    import tempfile
    import warnings

    from privdiff.eval.quality import compute_quality, train_feature_classifier
    from privdiff.eval.sampling import sample_sanity
    from privdiff.train.data import load_builtin

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        trained = _trained_model(model, model_dir, train_steps, Path(tmp)).eval()
    digits = load_builtin("digits", 16, 1)
    classifier = train_feature_classifier(digits.unit(), digits.labels, seed=0)
    n = fit_samples
    draws = {}
    cases = [("ddpm", 1000, 0), ("ddpm", 1000, 1), ("ancestral", 50, 0), ("ddpm", 100, 0), ("ddim", 50, 0), ("dpmsolver++", 20, 0)]
    print(f"\nsolver fit on a trained model ({'--model-dir' if model_dir else f'quickstart UNet, {train_steps} steps'}), "
          f"{n} samples each, against DDPM-1000 ancestral samples of the same weights")
    print(f"{'solver':<22}{'pixels at 0':>12}{'pixels at 1':>12}{'FD to DDPM-1000':>17}{'seconds':>9}")
    for solver, steps, seed in cases:
        start = time.perf_counter()
        draws[(solver, steps, seed)] = generate(trained, n, solver=solver, steps=steps, batch_size=n, seed=seed, progress=False).images
        seconds = time.perf_counter() - start
        x = draws[(solver, steps, seed)]
        sanity = sample_sanity(x, digits.unit())
        reference = draws[("ddpm", 1000, 0)] if (solver, steps, seed) != ("ddpm", 1000, 0) else None
        fd = "-" if reference is None else f"{compute_quality(reference, x, classifier=classifier, kid_subsets=10).fid:.2f}"
        name = f"{solver}-{steps}" + (" (2nd draw)" if seed else "")
        print(f"{name:<22}{sanity['saturated_low']:>12.3f}{sanity['saturated_high']:>12.3f}{fd:>17}{seconds:>9.1f}")
    real = sample_sanity(digits.unit(), digits.unit())
    print(f"{'real digits':<22}{real['saturated_low']:>12.3f}{real['saturated_high']:>12.3f}")


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
