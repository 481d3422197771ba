"""The seeded membership split: members, held-out non-members (never near-copies of a member) and planted duplicates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from privdiff.membership import ImageTable


def _too_close(candidates: torch.Tensor, members: torch.Tensor, min_l2: float) -> torch.Tensor:
    from privdiff.distances import nearest_neighbors

    if min_l2 <= 0 or len(members) == 0 or len(candidates) == 0:
        return torch.zeros(len(candidates), dtype=torch.bool)
    return nearest_neighbors(candidates, members, k=1).distances[:, 0] < min_l2


def _has_near_copy(images: torch.Tensor, min_l2: float) -> torch.Tensor:
    """Which images have another image of the same set within ``min_l2`` (an exact copy counts)."""
    from privdiff.distances import nearest_neighbors

    if min_l2 <= 0 or len(images) < 2:
        return torch.zeros(len(images), dtype=torch.bool)
    return nearest_neighbors(images, images, k=2).distances[:, 1] < min_l2


@dataclass
class Split:
    """The outcome of :func:`membership_split`: training rows (members + planted copies), held-out rows,
    and the images used as neither (held-out candidates too close to a member), with the reason."""

    train: ImageTable
    members: ImageTable
    heldout: ImageTable
    planted: dict[str, int]
    excluded: list[dict[str, Any]] = field(default_factory=list)


def membership_split(
    pool: ImageTable,
    num_members: int | None,
    num_heldout: int | None,
    seed: int,
    duplicate_images: int = 0,
    duplicate_copies: int = 1,
    heldout_min_l2: float = 0.02,
    heldout_pool: ImageTable | None = None,
) -> Split:
    """Choose members and held-out non-members by a seeded shuffle; plant duplicates among members.

    No non-member may be a near-copy of a member: held-out candidates within ``heldout_min_l2``
    (pixel l2 on [0, 1]) of a member are not used, and the split says which (``excluded``). With
    ``num_members=None`` every image that is not held out is a member, so a candidate with a
    near-copy anywhere in the pool becomes a member rather than being dropped. ``heldout_pool``
    (a second source, e.g. a test split) gives the non-members instead of the pool
    (``num_heldout=None``: all of it). ``duplicate_images`` members (k) each appear
    ``duplicate_copies`` times (n) in the training set, as in Carlini et al. 2023's study of duplication.
    """
    if (num_heldout is not None and num_heldout < 0) or (num_members is not None and num_members < 1):
        raise ValueError(f"need num_members >= 1 and num_heldout >= 0, got {num_members} and {num_heldout}")
    if num_heldout is None and heldout_pool is None:
        raise ValueError("num_heldout=None (all held-out images) needs a held-out source (data.heldout)")
    if duplicate_copies < 1:
        raise ValueError(f"duplicate_copies must be >= 1, got {duplicate_copies}")
    n = len(pool)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    excluded: list[dict[str, Any]] = []
    reason = f"held-out candidate within pixel l2 {heldout_min_l2:g} of a member"
    if heldout_pool is not None:
        if num_members is not None and num_members > n:
            raise ValueError(f"the source has {n} images, fewer than num_members={num_members}; lower it")
        members = pool.select(order[: num_members or n])
        candidates = torch.randperm(len(heldout_pool), generator=gen)
        close = _too_close(heldout_pool.select(candidates).unit(), members.unit(), heldout_min_l2)
        excluded = [{"id": heldout_pool.ids[i], "reason": reason} for i in candidates[close].tolist()]
        kept = candidates[~close]
        if num_heldout is not None and len(kept) < num_heldout:
            raise ValueError(
                f"the held-out source has {len(kept)} usable images (of {len(heldout_pool)}) for num_heldout={num_heldout}; lower it"
            )
        heldout = heldout_pool.select(kept[: num_heldout if num_heldout is not None else len(kept)])
    elif num_members is None:
        # Held-out images first, skipping any with a near-copy in the pool: all others are members.
        shuffled = pool.select(order)
        usable = order[~_has_near_copy(shuffled.unit(), heldout_min_l2)]
        if len(usable) < num_heldout + 1:
            raise ValueError(f"only {len(usable)} images of {n} have no near-copy in the pool, too few for num_heldout={num_heldout}")
        held_rows = usable[:num_heldout]
        is_held = torch.zeros(n, dtype=torch.bool)
        is_held[held_rows] = True
        members = pool.select(order[~is_held[order]])
        heldout = pool.select(held_rows)
    else:
        if num_members + num_heldout > n:
            raise ValueError(
                f"the source has {n} images, fewer than num_members={num_members} + num_heldout={num_heldout}; lower them"
            )
        members = pool.select(order[:num_members])
        rest = order[num_members:]
        close = _too_close(pool.select(rest).unit(), members.unit(), heldout_min_l2)
        if len(rest[~close]) < num_heldout:
            raise ValueError(
                f"only {len(rest[~close])} images remain for num_heldout={num_heldout} after skipping near-copies of members; lower num_heldout"
            )
        rest_kept = rest[~close]
        # Candidates passed over as near-copies of members before the last held-out one is chosen: neither member nor held out.
        last = int(rest_kept[num_heldout - 1]) if num_heldout else None
        position = {int(r): i for i, r in enumerate(rest.tolist())}
        limit = position[last] if last is not None else -1
        excluded = [{"id": pool.ids[int(r)], "reason": reason} for r in rest[close].tolist() if position[int(r)] < limit]
        heldout = pool.select(rest_kept[:num_heldout])
    if duplicate_images > len(members):
        raise ValueError(f"duplicate_images={duplicate_images} exceeds num_members={len(members)}")
    planted: dict[str, int] = {}
    copies = []
    if duplicate_images and duplicate_copies > 1:
        chosen = torch.randperm(len(members), generator=gen)[:duplicate_images].sort().values
        for row in chosen.tolist():
            planted[members.ids[row]] = duplicate_copies
            extra = members.select([row] * (duplicate_copies - 1))
            extra.ids = [f"{members.ids[row]}#copy{c}" for c in range(1, duplicate_copies)]
            copies.append(extra)
    train = ImageTable.concat([members, *copies])
    return Split(train=train, members=members, heldout=heldout, planted=planted, excluded=excluded)
