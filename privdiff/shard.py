"""Sharding the audit over the processes of a ``torch.distributed`` job (one rank, one share).

A shard is ``(rank, world_size)``. A sharded function computes its share of the work and gathers
every share with ``torch.distributed.all_gather_object``, so each process returns the same result
as one process would; every process of the group must call it with the same arguments. This file
holds no state: it reads the process group Lightning (or ``torch.distributed.init_process_group``)
has set up.
"""

from __future__ import annotations

from typing import Any

import torch

Shard = tuple[int, int]


def check_shard(shard: Shard | None) -> Shard | None:
    """Validate ``shard`` and return it; None (or a world of 1) means "no sharding" and returns None.

    Raises ``ValueError`` when the rank is out of range or when a world of more than one process
    has no initialized ``torch.distributed`` process group of that size to gather over.
    """
    if shard is None:
        return None
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shard must be (rank, world_size), got {shard!r}") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard=(rank, world_size) needs 0 <= rank < world_size, got {shard!r}")
    if world == 1:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"shard={shard!r} gathers over torch.distributed, which is not initialized in this process; "
            "run under Lightning's ddp strategy or call torch.distributed.init_process_group first"
        )
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(
            f"shard={shard!r} does not match this process group (rank {dist.get_rank()} of {dist.get_world_size()})"
        )
    return rank, world


def gather(obj: Any, shard: Shard) -> list[Any]:
    """Every process's ``obj``, in rank order (``torch.distributed.all_gather_object``).

    Tensors are gathered as they are; move them to the CPU first (the audit's shares are CPU
    tensors), so that no process receives tensors on another process's device.
    """
    out: list[Any] = [None] * shard[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def rows_of(num_blocks: int, shard: Shard | None) -> range:
    """The block numbers this shard computes: ``b`` with ``b % world_size == rank`` (all without a shard)."""
    if shard is None:
        return range(num_blocks)
    return range(shard[0], num_blocks, shard[1])
