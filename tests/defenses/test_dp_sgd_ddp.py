"""DP-SGD's update under DDP, on 2 gloo processes: the single-process update, with the noise added once."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from privdiff.defenses.dp_sgd import DPSGDDefense

WORLD, N, B, C = 2, 12, 6, 0.5


def defense(rank: int, world: int, sigma: float) -> DPSGDDefense:
    d = DPSGDDefense(noise_multiplier=sigma, max_grad_norm=C, accountant="rdp")
    d.on_data_ready(N, B)
    trainer = SimpleNamespace(  # the public Trainer properties check_trainer reads
        gradient_clip_val=None, accumulate_grad_batches=1, world_size=world, global_rank=rank,
        strategy=DDPStrategy(), precision="32-true", max_steps=1,
    )
    d.check_trainer(trainer)
    return d


def one_step(rank: int, world: int, sigma: float, features: int, rows: list[int]) -> tuple[torch.Tensor, DPSGDDefense]:
    """One DP step of a linear model on the given rows of a fixed batch; returns the parameter change."""
    torch.manual_seed(0)
    x, y = torch.randn(B, features), torch.randn(B, 1)
    d = defense(rank, world, sigma)
    model = d.wrap_model(torch.nn.Linear(features, 1))
    opt = d.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    torch.manual_seed(100 + rank)  # the noise's RNG
    opt.zero_grad()
    if rows:
        (model(x[rows]) - y[rows]).pow(2).mean().backward()
    d.on_before_optimizer_step(model)
    opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before, d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        exact, d = one_step(rank, WORLD, 1e-9, 4, list(range(rank, B, WORLD)))  # noise ~0: the clipped mean
        noise, _ = one_step(rank, WORLD, 1.0, 4000, [])  # no data: the update is the noise alone
        torch.save({"exact": exact, "noise": noise, "steps": d.steps, "eps": d.epsilon()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_update_equals_the_single_process_update_and_adds_the_noise_once(tmp_path) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single, d = one_step(0, 1, 1e-9, 4, list(range(B)))
    for r in ranks:
        # (sum of every process's clipped per-image gradients) / expected global batch, as one process
        torch.testing.assert_close(r["exact"], single, atol=1e-6, rtol=1e-5)
        assert r["steps"] == d.steps == 1 and r["eps"] == d.epsilon()
        assert torch.equal(r["noise"], ranks[0]["noise"])  # the same update on every process
    # Noise N(0, sigma^2 C^2) once for the global batch, divided by B: std C / B (sqrt(2) more if each rank added its own).
    std = ranks[0]["noise"].std().item()
    assert abs(std / (C / B) - 1) < 0.08, std
