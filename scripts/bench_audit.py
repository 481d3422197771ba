"""How the audit's time grows with the samples drawn and the training-set size, and what the paper's scale would cost.

    python scripts/bench_audit.py            # ~5 minutes on 2 cores
    python scripts/bench_audit.py --quick    # one small point per axis
    python scripts/bench_audit.py --memory   # peak memory at 2^14 and 2^16 samples, streamed and held at once

Part 1 runs ``privdiff.eval.audit.run_audit`` (the quickstart's audit settings: DPM-Solver++ 20
steps, generate-and-filter and calibrated-l2 extraction, memorization ratio, loss/PIA/SecMI, FID
with the small classifier) on the quickstart UNet (untrained: the work done does not depend on
the weights) against synthetic 16x16 members, and prints each stage's seconds for 3 sample counts
at a fixed training set and 3 training-set sizes at a fixed sample count.

Part 2 estimates the audit of Carlini et al. 2023's CIFAR-10 setting (2^20 samples per model
against 50k training images, 32x32x3) on one GPU. Every stage's floating-point work is counted
(``torch.utils.flop_counter`` for the CIFAR-10 DDPM-sized UNet; 2*N*M*D for distance products;
Inception-v3's published 5.7 GFLOPs per image for FID), and divided by the rate that stage reached
*here*, expressed as a fraction of this machine's fp32 matrix-product rate measured in the same
run, times the GPU's fp32 peak (``--gpu-tflops``; default 67, an H100 SXM's fp32). It assumes the
stages keep on a GPU the fraction of peak they reach here; it is an estimate, not a measurement.

``--memory`` measures instead the audit's peak resident memory (each point in a fresh process) at 2^14 and 2^16
samples of 16x16 against 512 digit members and 512 held-out digits (FID and precision/recall, both extraction attacks,
NN-ratio): streamed in shards of 4096 (the default), and, for contrast, in one shard holding every sample. The samples
come from a stand-in model that draws uniform noise with one noisy copy of a member in 64 samples (drawn by the
batch's generator, as a sampler's), so that the time goes to the audit rather than to a UNet on 2 cores; a UNet's
sampling holds one batch at a time either way.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from privdiff.eval.audit import AuditConfig, AuditData, run_audit
from privdiff.distances import nearest_neighbors
from privdiff.train.data import ImageTable
from privdiff.cli import module_from_config
from privdiff.model import DiffusionModel
from privdiff.train.denoiser import build_unet

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sample", "extraction", "memorization", "mia", "quality")
PAPER_SAMPLES, PAPER_MEMBERS, PAPER_HELDOUT, CIFAR_D = 2**20, 50_000, 10_000, 3 * 32 * 32
INCEPTION_FLOPS = 2 * 5.7e9  # multiply-adds of Inception-v3 at 299x299 (Szegedy et al. 2016), as flops


def synthetic_table(n: int, seed: int, size: int = 16) -> ImageTable:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return ImageTable(images, torch.randint(0, 10, (n,), generator=g), [f"synthetic/{seed}/{i}" for i in range(n)])


def quickstart_model() -> DiffusionModel:
    torch.manual_seed(0)
    return module_from_config(REPO / "configs/model/small.yaml").diffusion.eval()


def audit_config(num_samples: int, num_members: int) -> AuditConfig:
    settings = yaml.safe_load((REPO / "configs/audit/quickstart.yaml").read_text())["audit"]
    settings["attacks"]["mia"]["init_args"]["examples"] = num_members
    return AuditConfig(**{**settings, "num_samples": num_samples, "progress": False})


def timed_audit(model: DiffusionModel, num_samples: int, num_members: int) -> dict[str, float]:
    members, heldout = synthetic_table(num_members, 1), synthetic_table(num_members, 2)
    data = AuditData(members=members, heldout=heldout, copies=torch.ones(num_members, dtype=torch.long))
    start = time.perf_counter()
    result = run_audit(model, data, audit_config(num_samples, num_members))
    return {**result["timings_s"], "total": time.perf_counter() - start}


def matmul_rate(d: int = 2048, repeats: int = 5) -> float:
    a, b = torch.rand(d, d), torch.rand(d, d)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * d**3 / best


def unet_flops(unet: torch.nn.Module, image_size: int, channels: int) -> float:
    """Floating-point operations of one forward pass on one image (convolutions, products, attention)."""
    x = torch.randn(2, channels, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500, 500]))
    return counter.get_total_flops() / 2


def cifar10_ddpm_unet() -> torch.nn.Module:
    """A UNet the size of Ho et al.'s CIFAR-10 DDPM (google/ddpm-cifar10-32: 128-256-256-256, 2 blocks, attention at 16x16)."""
    return build_unet(32, 3, (128, 256, 256, 256), 2, (1,), norm_num_groups=32)


class NoiseSampler(torch.nn.Module):
    """The stand-in model of ``--memory``: uniform noise, and a noisy copy of a member in one sample of 64."""

    def __init__(self, members: torch.Tensor) -> None:
        super().__init__()
        from privdiff.train.pixel import PixelDiffusion

        self.model = PixelDiffusion(16, 1, block_out_channels=(8, 16), attention_levels=(), num_train_timesteps=100)
        self.members = members

    def __call__(self):
        members, model = self.members, self.model

        def sample(n, solver="ancestral", steps=50, cond=None, generator=None):
            x = torch.rand(n, *members.shape[1:], generator=generator)
            copy = torch.rand(n, generator=generator) < 1 / 64
            rows = torch.randint(0, len(members), (n,), generator=generator)
            x[copy] = (members[rows[copy]] + 0.02 * torch.randn(x[copy].shape, generator=generator)).clamp(0, 1)
            return x

        model.sample = sample
        return model


def one_memory_point(num_samples: int, shard_size: int) -> None:
    """One ``--memory`` point in this process: print resident memory before the audit and at its peak (MiB)."""
    from privdiff.eval.extraction import ExtractionAttack
    from privdiff.eval.memorization import NNRatioMemorization
    from privdiff.eval.quality import SampleQuality
    from privdiff.train.data import load_builtin

    pool = load_builtin("digits", 16, 1)
    members, heldout = pool.select(range(512)), pool.select(range(512, 1024))
    data = AuditData(members=members, heldout=heldout, copies=torch.ones(512, dtype=torch.long), pool=pool)
    config = AuditConfig(num_samples=num_samples, shard_size=shard_size, batch_size=256, progress=False, attacks={
        "quality": SampleQuality(), "extraction": ExtractionAttack(min_clique=5), "memorization": NNRatioMemorization()})
    model = NoiseSampler(members.unit())()
    run_audit(model, data, AuditConfig(**{**config.__dict__, "num_samples": 256}))  # warm-up: libraries, classifier cache
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = run_audit(model, data, config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{num_samples} {shard_size} {before:.0f} {peak:.0f} {time.perf_counter() - start:.1f} "
          f"{result['extraction']['union']['extracted']} {result['quality']['fid']:.2f}")


def measure_memory(threads: int) -> None:
    """Peak memory of the audit at 2^14 and 2^16 samples, streamed and in one shard; each point in a fresh process."""
    print("audit peak resident memory (MiB), 16x16 samples vs 512 members; each point a fresh process")
    print(f"{'samples':>8} {'shard':>8} {'before':>8} {'peak':>8} {'growth':>8} {'samples held':>13} {'seconds':>8} "
          f"{'extracted':>9} {'FID':>7}")
    for shard_size, counts in ((4096, (2**14, 2**16)), (None, (2**14, 2**16))):
        for n in counts:
            out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--memory-point", str(n),
                                  "--shard-size", str(shard_size or n)], capture_output=True, text=True, check=True)
            _, size, before, peak, seconds, extracted, fid = out.stdout.split()[-7:]
            held = n * 16 * 16 * 4 / 2**20
            print(f"{n:>8} {size:>8} {before:>8} {peak:>8} {float(peak) - float(before):>8.0f} {held:>12.0f}M "
                  f"{seconds:>8} {extracted:>9} {fid:>7}")


def main(threads: int = 2, quick: bool = False, gpu_tflops: float = 67.0, memory: bool = False, memory_point: int = 0,
         shard_size: int = 4096) -> None:
    """Time the audit's stages at growing sizes here, then estimate the paper's scale on one GPU.

    Args:
        threads: torch CPU threads
        quick: one small point per axis
        gpu_tflops: the GPU's fp32 peak in TFLOP/s (H100 SXM: 67)
        memory: measure the audit's peak memory at 2^14 and 2^16 samples instead
        memory_point: (internal) one memory point of this many samples in this process
        shard_size: (internal) the memory point's audit shard size
    """
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    if memory_point:
        one_memory_point(memory_point, shard_size)
        return
    if memory:
        measure_memory(threads)
        return
    model = quickstart_model()
    fixed_members, fixed_samples = (256, 256) if quick else (1024, 1024)
    sample_points = (256,) if quick else (256, 1024, 4096)
    member_points = (256,) if quick else (256, 1024, 4096)
    peak = matmul_rate()
    print(f"this machine: fp32 matmul {peak / 1e9:.0f} GFLOP/s ({threads} threads); quickstart UNet, 16x16 synthetic members")
    print("\naudit seconds per stage (quickstart settings: DPM-Solver++ 20 steps, 3 MIAs on members + as many held-out, FID)")
    header = f"{'samples':>8} {'members':>8} " + " ".join(f"{s:>12}" for s in STAGES) + f" {'total':>8}"
    print(header)
    rows = []
    timed_audit(model, 64, 64)  # warm-up
    points = [(s, fixed_members) for s in sample_points] + [(fixed_samples, m) for m in member_points]
    for samples, members in dict.fromkeys(points):  # in order, each point once
        t = timed_audit(model, samples, members)
        rows.append((samples, members, t))
        print(f"{samples:>8} {members:>8} " + " ".join(f"{t[s]:>12.1f}" for s in STAGES) + f" {t['total']:>8.1f}")

    # -- part 2: the paper's scale on one GPU ----------------------------------------------------
    small_flops = unet_flops(model.trainable, 16, 1)
    cifar_flops = unet_flops(cifar10_ddpm_unet(), 32, 3)
    biggest = max(rows, key=lambda r: r[0])
    samples, members, t = biggest
    settings = audit_config(samples, members)
    sample_eff = samples * settings.steps * small_flops / t["sample"] / peak
    g = torch.Generator().manual_seed(0)
    q, r = torch.rand(2048, CIFAR_D, generator=g), torch.rand(4096, CIFAR_D, generator=g)
    nearest_neighbors(q[:64], r, k=50)
    start = time.perf_counter()
    nearest_neighbors(q, r, k=50)
    knn_eff = 2 * 2048 * 4096 * CIFAR_D / (time.perf_counter() - start) / peak
    mia = dict(settings.plugins())["mia"]
    mia_forwards = len(mia.loss_timesteps) + 2 + 1 + mia.secmi_k  # loss, PIA (2), SecMI (1 + k)
    gpu = gpu_tflops * 1e12
    work = {
        "sample (DPM-Solver++ 20 steps)": (PAPER_SAMPLES * 20 * cifar_flops, sample_eff),
        "sample (DDPM 1000 steps, the paper's)": (PAPER_SAMPLES * 1000 * cifar_flops, sample_eff),
        "calibrated l2 (k=50 vs members)": (2 * PAPER_SAMPLES * PAPER_MEMBERS * CIFAR_D, knn_eff),
        "generate-and-filter graph (samples x samples)": (2 * PAPER_SAMPLES**2 * CIFAR_D, knn_eff),
        # the attacks are UNet forward passes like sampling's: the same efficiency
        "membership inference (60k images)": ((PAPER_MEMBERS + PAPER_HELDOUT) * mia_forwards * cifar_flops, sample_eff),
        "FID (Inception-v3, samples + 50k real)": ((PAPER_SAMPLES + PAPER_MEMBERS) * INCEPTION_FLOPS, sample_eff),
    }
    print(f"\nestimate at the paper's scale: 2^20 samples of a CIFAR-10 DDPM-sized UNet ({cifar_flops / 1e9:.1f} GFLOPs per image "
          f"per step) vs 50k members, on one GPU of {gpu_tflops:g} fp32 TFLOP/s")
    print(f"measured here: UNet sampling at {sample_eff:.2f} of matmul peak, kNN (k=50, D=3072) at {knn_eff:.2f}")
    print(f"{'stage':<48}{'PFLOP':>10}{'GPU hours':>11}")
    total = 0.0
    for name, (flops, eff) in work.items():
        hours = flops / (eff * gpu) / 3600
        if "1000 steps" not in name:
            total += hours
        print(f"{name:<48}{flops / 1e15:>10.1f}{hours:>11.2f}")
    print(f"{'total with DPM-Solver++ 20 steps':<48}{'':>10}{total:>11.2f}")


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
