"""Poisson sampling for DP-SGD: the loader whose batches the accountant assumes, on one process or shared out under DDP.

Each row joins each step's batch independently with probability q = batch_size / N (the assumption of every
DP-SGD accountant). On one process that is Opacus's ``DPDataLoader``; under DDP the processes share one global
Poisson batch (:class:`DistributedPoissonBatchSampler`); with ``max_physical_batch_size`` a Poisson batch is cut
into physical batches that one optimizer step sums (:class:`SplitPoissonBatches`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from torch.utils.data import DataLoader, Sampler

__all__ = ["DistributedPoissonBatchSampler", "SplitPoissonBatches", "poisson_loader"]


class DistributedPoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling for a DDP job: one global Poisson batch per step, shared out among the processes.

    Every process draws the same Bernoulli(q) mask over all N rows (its generator is seeded alike
    on every rank) and keeps the selected rows r with ``r % world_size == rank``. The union of the
    local batches is exactly a Poisson sample of the whole training set at rate q -- the batch one
    process would draw from the same generator -- so the accountant's assumption (each row joins
    each step independently with probability q) holds for the global batch.

    Opacus's ``DistributedUniformWithReplacementSampler`` is not used for two reasons: it skips an
    empty local batch (the processes then disagree on the number of steps and the gradient
    all-reduce deadlocks or pairs different steps), and it draws each rank's mask from the global
    RNG, which Lightning seeds alike on every rank, so the rows at the same position of every
    rank's shard would join a batch together rather than independently.

    Args:
        num_samples: N, rows of the training set.
        sample_rate: q.
        rank, world_size: this process and the number of processes.
        generator: seeded alike on every process.
        steps: batches per epoch (default ``int(1 / q)``, as Opacus).
    """

    def __init__(
        self, *, num_samples: int, sample_rate: float, rank: int, world_size: int,
        generator: torch.Generator, steps: int | None = None,
    ) -> None:
        if num_samples < 1 or not 0 < sample_rate <= 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need num_samples >= 1, 0 < sample_rate <= 1 and 0 <= rank < world_size, got "
                f"{num_samples}, {sample_rate}, {rank}, {world_size}"
            )
        self.num_samples, self.sample_rate = num_samples, sample_rate
        self.rank, self.world_size, self.generator = rank, world_size, generator
        self.steps = steps if steps is not None else int(1 / sample_rate)
        self.largest_share = 0  # the largest local batch of the last global batch (the same on every rank)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            rows = (torch.rand(self.num_samples, generator=self.generator) < self.sample_rate).nonzero().flatten()
            owner = rows % self.world_size
            self.largest_share = int(torch.bincount(owner, minlength=self.world_size).max())
            yield rows[owner == self.rank].tolist()  # possibly empty: every process takes every step


class SplitPoissonBatches(BatchSplittingSampler):
    """Opacus's ``BatchMemoryManager`` sampler, without a length, and in step across DDP processes.

    It tells the DPOptimizer, in order, which physical batch ends a Poisson batch. Lightning ends an
    epoch after ``len(loader)`` batches, which for split Poisson batches is only an estimate: a cut
    in the middle of a Poisson batch would leave the optimizer's queue of skip signals out of step
    with the batches (two Poisson batches merged into one DP step). Without a length, Lightning
    runs each epoch until the sampler is exhausted. Under DDP each process splits its share into as
    many chunks as the largest share needs (some may be empty), so that all processes take the same
    number of physical steps.
    """

    def __len__(self) -> int:
        raise TypeError("split Poisson batches have no fixed number")

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            largest = getattr(self.sampler, "largest_share", len(batch))
            chunks = max(1, math.ceil(largest / self.max_batch_size))
            parts = [p.tolist() for p in np.array_split(np.asarray(batch, dtype=np.int64), chunks)]
            for part in parts[:-1]:
                self.optimizer.signal_skip_step(do_skip=True)
                yield part
            self.optimizer.signal_skip_step(do_skip=False)
            yield parts[-1]


def _settings(loader: DataLoader) -> dict[str, Any]:
    """What a loader built from ``loader`` keeps: its dataset, collate function (Opacus's gives empty batches their
    shape) and worker settings."""
    keys = ("collate_fn", "num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
            "prefetch_factor", "persistent_workers")
    return {"dataset": loader.dataset, **{key: getattr(loader, key) for key in keys}}


def _with_batch_sampler(dp_loader: DataLoader, batch_sampler: Any) -> DataLoader:
    """The DP loader's settings with another batch sampler."""
    loader = DataLoader(**_settings(dp_loader), batch_sampler=batch_sampler, generator=dp_loader.generator)
    loader._privdiff_dp = True
    return loader


def poisson_loader(
    loader: DataLoader, sample_rate: float, *, generator: torch.Generator | None,
    shared_generator: Callable[[], torch.Generator] | None, rank: int = 0, world_size: int = 1,
    max_physical_batch_size: int | None = None, optimizer: Any = None,
) -> DataLoader:
    """``loader``'s dataset and settings, batched by Poisson sampling at ``sample_rate``.

    One process draws with ``generator``; under DDP (``world_size`` > 1) every process draws the same global mask
    from ``shared_generator()`` and keeps its share. ``max_physical_batch_size`` cuts each Poisson batch into
    physical batches, signalling the DP ``optimizer`` which one ends the step.
    """
    # Built directly rather than with DPDataLoader.from_data_loader, whose sample rate is
    # 1/len(loader) = 1/ceil(N/B): the loader must draw with the accountant's q = B/N.
    dp_loader = DPDataLoader(**_settings(loader), sample_rate=sample_rate, generator=generator)
    if world_size > 1:
        sampler = DistributedPoissonBatchSampler(num_samples=len(dp_loader.dataset), sample_rate=sample_rate, rank=rank,
                                                 world_size=world_size, generator=shared_generator())
        dp_loader = _with_batch_sampler(dp_loader, sampler)
    if max_physical_batch_size is None:
        return dp_loader
    if optimizer is None:
        raise ValueError("dp_sgd max_physical_batch_size needs the DP optimizer: call wrap_optimizer before wrap_train_loader")
    return _with_batch_sampler(
        dp_loader, SplitPoissonBatches(sampler=dp_loader.batch_sampler, max_batch_size=max_physical_batch_size, optimizer=optimizer),
    )
