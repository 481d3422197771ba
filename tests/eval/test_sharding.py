"""The audit sharded over two gloo processes gives the same results as one process for the same seeds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from privdiff.defenses.base import Defense
from privdiff.eval.audit import AuditConfig, AuditData, run_audit
from privdiff.distances import nearest_neighbors
from privdiff.eval.sampling import generate
from privdiff.shard import check_shard
from privdiff.train.data import load_builtin
from privdiff.eval.extraction import ExtractionAttack
from privdiff.eval.memorization import NNRatioMemorization
from privdiff.train.denoiser import build_scheduler, build_unet
from privdiff.train.pixel import PixelDiffusion

WORLD = 2


class CopyingSampler(PixelDiffusion):
    """Samples are noisy copies of given images, chosen by the batch's generator only (no state)."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(16, 1, block_out_channels=(8, 16), attention_levels=(), num_train_timesteps=100)
        self.images = images

    def sample(self, n, solver="ddim", steps=10, cond=None, generator=None):
        rows = torch.randint(0, 6, (n,), generator=generator)  # six images copied again and again
        noise = torch.randn(n, *self.images.shape[1:], generator=generator)
        novel = torch.rand(n, generator=generator) < 0.5  # the other half: pure noise
        x = torch.where(novel.view(-1, 1, 1, 1), torch.rand(n, *self.images.shape[1:], generator=generator), self.images[rows] + 0.01 * noise)
        return x.clamp(0, 1)


class DarkFilter(Defense):
    """Rejects bright samples, so that some are redrawn in later rounds (the redraw order matters)."""

    name = "dark_filter"

    def __init__(self) -> None:
        self.checked = 0  # a defense's own count must match one process's too

    def keep_mask(self, images, context):
        self.checked += len(images)
        return images.flatten(1).mean(1) < 0.5


def tiny_unet_denoiser() -> PixelDiffusion:
    torch.manual_seed(0)
    return PixelDiffusion.from_parts(build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=8), build_scheduler(100))


def workload(shard) -> dict:
    """Everything the test compares, computed with ``shard`` (None: one process)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pool = load_builtin("digits", 16, 1)
    members, heldout = pool.select(range(40)), pool.select(range(40, 72))
    out: dict = {}
    real = generate(tiny_unet_denoiser(), 10, solver="ddim", steps=2, batch_size=3, seed=5, progress=False, shard=shard)
    out["unet"] = real.images
    dark = DarkFilter()
    filtered = generate(
        tiny_unet_denoiser(), 11, solver="ddim", steps=2, batch_size=2, seed=1, progress=False,
        defenses=[dark], max_rounds=3, shard=shard,
    )
    out["filtered"] = (filtered.images, filtered.num_drawn, filtered.num_rejected, dark.checked)
    queries, refs = torch.rand(37, 1, 8, 8), torch.rand(29, 1, 8, 8)
    refs[3] = queries[5]  # an exact copy: recomputed exactly, distance 0
    nb = nearest_neighbors(queries, refs, k=4, block_size=5, shard=shard)
    out["knn"] = (nb.distances, nb.indices)
    config = AuditConfig(num_samples=48, batch_size=7, shard_size=21, steps=2, solver="ddim", progress=False, attacks={
        "extraction": ExtractionAttack(min_clique=3, tau=0.05, delta=0.05, calibrated_threshold=0.35, calibrated_n=8),
        "memorization": NNRatioMemorization(),
    })
    data = AuditData(members, heldout, torch.ones(len(members), dtype=torch.long))
    result = run_audit(CopyingSampler(members.unit()[:6]), data, config, shard=shard)
    result.pop("timings_s")
    out["audit"] = result
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(workload((rank, WORLD)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_sampling_search_and_audit_equal_one_process(tmp_path) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    single = workload(None)
    shards = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for merged in shards:  # every process gets the whole result, equal to one process's
        torch.testing.assert_close(merged["unet"], single["unet"], rtol=0, atol=1e-6)
        assert merged["unet"].shape == (10, 1, 8, 8)
        (images, drawn, rejected, checked), (images1, drawn1, rejected1, checked1) = merged["filtered"], single["filtered"]
        assert (drawn, rejected, checked) == (drawn1, rejected1, checked1) and drawn1 == checked1 > 11  # some were redrawn
        torch.testing.assert_close(images, images1, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged["knn"][0], single["knn"][0], rtol=0, atol=1e-6)
        assert torch.equal(merged["knn"][1], single["knn"][1])
        assert single["knn"][0][5, 0] == 0 and single["knn"][1][5, 0] == 3
        assert merged["audit"] == single["audit"]
    audit = single["audit"]
    assert audit["extraction"]["union"]["extracted"] >= 3  # a non-trivial result was compared
    assert audit["memorization"]["num_memorized"] > 0 and audit["sampling"]["num_samples"] == 48


def test_a_shard_needs_a_matching_process_group() -> None:
    assert check_shard(None) is None and check_shard((0, 1)) is None
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        check_shard((2, 2))
    with pytest.raises(ValueError, match="not initialized"):
        nearest_neighbors(torch.rand(3, 4), torch.rand(3, 4), shard=(0, 2))
