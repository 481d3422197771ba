"""scripts/gpu_check.py: its CPU smoke run passes, and its per-example gradient check can fail."""

import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
ROWS = ("ddpm non-private", "ddpm DP-SGD", "per-sample gradients (ddpm)", "ddpm DP-SGD bf16-mixed", "LoRA", "DP-LoRA",
        "per-sample gradients (DP-LoRA)", "sampler vs diffusers")


def table_status(output: str) -> dict[str, str]:
    """Row name -> status column of the script's table (columns are separated by two or more spaces)."""
    rows = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 5 and cells[4] in ("ok", "FAIL", "skipped"):
            rows[cells[0]] = cells[4]
    return rows


def test_cpu_smoke_run_passes():
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = table_status(done.stdout)
    for row in ROWS:
        assert status.get(row) == "ok", f"{row}: {status.get(row)}\n{done.stdout}"
    assert status.get("ddp all-reduce (nccl)") == "skipped"


def test_per_sample_gradient_check_catches_wrong_gradients(load_script):
    gpu_check = load_script("gpu_check")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    den, defense, opt = gpu_check.private_ddpm(gpu_check.SMOKE, cpu)
    loss_of = gpu_check.fixed_ddpm_loss(den, 3, gpu_check.SMOKE, cpu)
    params = {name: p for name, p in den.trainable.named_parameters() if p.requires_grad}
    dp = gpu_check.dp_per_sample_grads(den.trainable, defense, opt, loss_of, 3)
    ref = gpu_check.reference_grads(den.trainable, params, loss_of, 3)

    right = gpu_check.compare_per_sample_grads(dp, ref)
    assert right.ok and right.max_rel_error < 1e-4, right.message
    doubled = gpu_check.compare_per_sample_grads({k: 2 * g for k, g in dp.items()}, ref)
    assert not doubled.ok and "mismatch" in doubled.message and abs(doubled.max_rel_error - 1.0) < 1e-3
    swapped = gpu_check.compare_per_sample_grads({k: g.roll(1, 0) for k, g in dp.items()}, ref)  # examples mixed up
    assert not swapped.ok
    nan = gpu_check.compare_per_sample_grads({k: g * float("nan") for k, g in dp.items()}, ref)
    assert not nan.ok and "non-finite" in nan.message
