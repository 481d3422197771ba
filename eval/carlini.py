"""Training-data extraction attacks of Carlini et al. 2023 on generated samples, as pure tensor functions.

Carlini, Hayes, Nasr et al., "Extracting Training Data from Diffusion Models" (USENIX Security
2023, arXiv:2301.13188):

- :func:`generate_and_filter`, the black-box generate-and-filter attack (§4.2): generations that
  form a large clique of near-identical images under tiled l2 are likely memorized; the flagged
  ones are then checked against the training set with plain l2.
- :func:`calibrated_extraction`, the white-box CIFAR-10 check (§5.1): every generation against the
  training set with the calibrated l2, extracted when the score is below 1.
- :func:`by_copies`, extraction by the number of copies of an image in the training set (§4.2, Fig. 5).

Both attacks work on images in [0, 1] and return an :class:`ExtractionResult` with one record per
extracted training image. They know nothing of the audit: the audit plugins
(:mod:`privdiff.eval.extraction`, :mod:`privdiff.eval.prompt_extraction`) call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from privdiff.distances import (
    DEFAULT_BLOCK_BYTES,
    Calibrated,
    _check_images,
    _check_pair,
    _pairwise_tiled,
    _tile_shape,
    calibrated_l2,
    nearest_neighbors,
    resolve_tile_size,
)
from privdiff.shard import Shard, check_shard, gather, rows_of

__all__ = ["ExtractionRecord", "ExtractionResult", "by_copies", "calibrated_extraction", "clique_flags", "generate_and_filter",
           "match_flagged"]


@dataclass
class ExtractionRecord:
    """One extracted training image and the generated sample closest to it.

    Attributes:
        train_index: index into the reference (training) set.
        sample_index: index into the generated samples.
        distance: plain l2 (Carlini et al. 2023) between the two, on [0, 1] pixels.
        score: the attack's own score where it has one (calibrated l2), else None.
    """

    train_index: int
    sample_index: int
    distance: float
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return {
            "train_index": int(self.train_index),
            "sample_index": int(self.sample_index),
            "distance": float(self.distance),
            "score": None if self.score is None else float(self.score),
        }


@dataclass
class ExtractionResult:
    """Outcome of one extraction attack.

    Attributes:
        method: ``"generate_and_filter"`` or ``"calibrated_l2"``.
        records: one record per extracted training image (the closest sample), sorted by
            ``train_index``.
        num_samples_flagged: samples the attack flagged (in a large clique, or calibrated score
            below the threshold).
        num_samples: samples examined.
        num_references: size of the training set they were checked against.
        params: the attack's settings, for the report.
    """

    method: str
    records: list[ExtractionRecord]
    num_samples_flagged: int
    num_samples: int
    num_references: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def extracted_indices(self) -> list[int]:
        """Sorted, unique training indices that were extracted."""
        return sorted({int(r.train_index) for r in self.records})

    @property
    def num_extracted(self) -> int:
        """Number of distinct extracted training images."""
        return len(self.extracted_indices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary with every record."""
        return {
            "method": self.method,
            "num_samples": int(self.num_samples),
            "num_references": int(self.num_references),
            "num_samples_flagged": int(self.num_samples_flagged),
            "num_extracted": self.num_extracted,
            "extracted_indices": self.extracted_indices,
            "records": [r.to_dict() for r in self.records],
            "params": {k: _jsonable(v) for k, v in self.params.items()},
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return str(v)


def _closest_per_train(
    train_idx: Tensor, sample_idx: Tensor, dist: Tensor, score: Tensor | None = None
) -> list[ExtractionRecord]:
    """Keep, for every training index, the match with the smallest distance."""
    if train_idx.numel() == 0:
        return []
    order = torch.argsort(dist, stable=True)
    order = order[torch.argsort(train_idx[order], stable=True)]
    t = train_idx[order]
    first = torch.ones_like(t, dtype=torch.bool)
    first[1:] = t[1:] != t[:-1]
    keep = order[first]
    tr, sa, di = train_idx[keep].tolist(), sample_idx[keep].tolist(), dist[keep].tolist()
    sc = score[keep].tolist() if score is not None else [None] * len(tr)
    return [ExtractionRecord(a, b, c, d) for a, b, c, d in zip(tr, sa, di, sc, strict=True)]


# ---------------------------------------------------------------------------------- cliques


def _adjacency(
    x: Tensor, tau: float, tile: tuple[int, int], max_block_bytes: int, shard: Shard | None = None
) -> Tensor:
    """Boolean (n, n) graph: edge where tiled l2 <= tau, no self loops; built in row blocks.

    With ``shard`` this process builds the row blocks ``b % world_size == rank`` and the rows of
    every process are gathered.
    """
    n = x.shape[0]
    adj = torch.zeros(n, n, dtype=torch.bool, device=x.device)
    rows = max(1, max_block_bytes // (3 * 8 * max(1, n)))  # distance block + temporaries
    blocks = range(0, n, rows)
    mine = [blocks[b] for b in rows_of(len(blocks), shard)]
    for i in mine:
        adj[i : i + rows] = _pairwise_tiled(x[i : i + rows], x, tile) <= tau
    if shard is not None:
        for share in gather([(i, adj[i : i + rows].cpu()) for i in mine], shard):
            for i, block in share:
                adj[i : i + rows] = block.to(adj.device)
    adj.fill_diagonal_(False)
    return adj


def _clique_members(adj: Tensor, min_clique: int) -> Tensor:
    """Samples found in a clique of at least ``min_clique`` members (greedy lower bound).

    1. Peel the graph to its (min_clique - 1)-core: a vertex of a clique of size s has at least
       s - 1 neighbours inside it, so vertices of smaller degree (after removing other such
       vertices) cannot belong to one.
    2. From each remaining vertex not yet flagged, in order of decreasing degree, grow a clique
       greedily: repeatedly add the candidate with the most neighbours among the candidates, then
       keep only candidates adjacent to it; stop when no candidate is left or the clique can no
       longer reach ``min_clique``.
    3. Every member of a grown clique of size >= min_clique is flagged.

    Flagged samples provably lie in a clique of the required size (no false positives w.r.t. the
    exact max-clique criterion); the greedy search may miss some (false negatives), which is rare
    for the tight clusters a memorized image produces.
    """
    n = adj.shape[0]
    flagged = torch.zeros(n, dtype=torch.bool, device=adj.device)
    if n == 0 or n < min_clique:
        return flagged
    if min_clique <= 1:
        return ~flagged
    alive = torch.ones(n, dtype=torch.bool, device=adj.device)
    deg = adj.sum(dim=1)
    while True:  # k-core peeling, O(n^2) in total
        low = alive & (deg < min_clique - 1)
        if not bool(low.any()):
            break
        alive &= ~low
        deg -= adj[:, low].sum(dim=1)
    sub = adj & alive.unsqueeze(0) & alive.unsqueeze(1)
    deg = sub.sum(dim=1)
    alive_py = alive.tolist()
    seeds = [v for v in torch.argsort(deg, descending=True, stable=True).tolist() if alive_py[v]]
    done = [False] * n
    for seed in seeds:
        if done[seed]:
            continue
        clique = [seed]
        cand = sub[seed].clone()
        # counts[u] = neighbours of u among the candidates, updated as candidates drop out
        counts = sub[:, cand].sum(dim=1)
        while True:
            cand_idx = cand.nonzero().squeeze(1)
            c = cand_idx.numel()
            if c == 0 or len(clique) + c < min_clique:
                break
            if bool((counts[cand_idx] == c - 1).all()):  # the candidates already form a clique
                clique.extend(cand_idx.tolist())
                break
            v = int(cand_idx[int(counts[cand_idx].argmax())])
            clique.append(v)
            removed = cand & ~sub[v]  # includes v itself (no self loops)
            cand &= sub[v]
            counts -= sub[:, removed].sum(dim=1)
        if len(clique) >= min_clique:
            for v in clique:
                done[v] = True
    return torch.tensor(done, dtype=torch.bool, device=adj.device)



def clique_flags(
    samples: Tensor,
    labels: Tensor | None,
    tau: float,
    min_clique: int,
    tile_size: int | None = None,
    *,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    shard: Shard | None = None,
) -> Tensor:
    """(N,) bool: the samples that lie in a clique of ``min_clique`` under tiled l2 <= ``tau``, within one label.

    The first half of :func:`generate_and_filter`; it never looks at the training set, so the same flags can be
    matched to the members and, as a control, to held-out images (:func:`match_flagged`).
    """
    n = samples.shape[0]
    tile = _tile_shape(samples, resolve_tile_size(samples.shape[-2], samples.shape[-1], tile_size))
    flagged = torch.zeros(n, dtype=torch.bool, device=samples.device)
    groups = [None] if labels is None else torch.unique(labels).tolist()
    for g in groups:
        idx = torch.arange(n, device=samples.device) if g is None else (labels == g).nonzero().squeeze(1)
        if idx.numel() < min_clique:
            continue
        adj = _adjacency(samples[idx], float(tau), tile, max_block_bytes, shard)
        flagged[idx[_clique_members(adj, min_clique)]] = True
    return flagged


def match_flagged(
    samples: Tensor,
    flagged: Tensor,
    references: Tensor,
    delta: float,
    *,
    block_size: int | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    shard: Shard | None = None,
) -> list[ExtractionRecord]:
    """The references some flagged sample lies within plain l2 ``delta`` of (its nearest reference), the closest sample each."""
    sample_idx = flagged.nonzero().squeeze(1)
    if not sample_idx.numel() or not len(references):
        return []
    nb = nearest_neighbors(samples[sample_idx], references, k=1, block_size=block_size, max_block_bytes=max_block_bytes, shard=shard)
    dist, train_idx = nb.distances[:, 0], nb.indices[:, 0]
    hit = dist <= delta
    return _closest_per_train(train_idx[hit], sample_idx[hit], dist[hit])


def generate_and_filter(
    samples: Tensor,
    references: Tensor,
    labels: Tensor | None = None,
    tau: float = 0.15,
    min_clique: int = 10,
    delta: float = 0.15,
    tile_size: int | None = None,
    *,
    block_size: int | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    shard: Shard | None = None,
) -> ExtractionResult:
    """Carlini et al. 2023 §4.2 black-box generate-and-filter extraction.

    Within each label group (all samples when ``labels`` is None; in the paper, the generations
    of one prompt), build a graph over the generated samples with an edge where their tiled l2
    is at most ``tau``, and flag the samples that lie in a clique of at least ``min_clique``
    members (the paper uses 10). Exact maximum clique is NP-hard; flagged samples come from a
    greedy approximation (see below). A training image is extracted when a flagged sample's plain
    l2 to it is at most ``delta`` (the (l2, delta)-extraction criterion); its record keeps the
    closest flagged sample.

    Clique approximation: the graph is first peeled to its (min_clique - 1)-core; then, from each
    remaining sample in order of decreasing degree, a clique is grown greedily (always adding the
    candidate with the most neighbours among the remaining candidates). Members of every grown
    clique of at least ``min_clique`` samples are flagged. This never flags a sample that is not
    in such a clique, and may miss some that are.

    Defaults. The paper's tiled distance is normalised differently; here all distances are RMS
    l2 on [0, 1] pixels. ``tau = delta = 0.15``: by the triangle inequality, two samples within
    ``delta / 2`` of one training image are within ``delta`` of each other, and unrelated natural
    images are typically 0.2-0.4 apart in this l2, so 0.15 links near-copies but not merely
    similar images. ``tile_size=None`` picks :func:`~privdiff.distances.resolve_tile_size`:
    the whole image (plain l2) at <= 16 px, where small tiles hold too few pixels, else
    ``min(H, W) // 4`` (the paper's 4x4 grid of 128 px tiles on 512 px images).

    Args:
        samples: generated images (N, C, H, W) in [0, 1].
        references: training images (M, C, H, W) in [0, 1].
        labels: optional (N,) integer class label (or prompt id) per sample; cliques are only
            sought within one label.
        tau: tiled-l2 edge threshold, > 0.
        min_clique: clique size that flags its members, >= 1.
        delta: plain-l2 threshold for matching a flagged sample to a training image, > 0.
        tile_size: tile side in pixels dividing H and W, or None for the default above.
        block_size: passed to :func:`~privdiff.distances.nearest_neighbors`.
        max_block_bytes: memory cap for one distance block (graph rows and the neighbour search).
        shard: ``(rank, world_size)``: split the graph's rows and the neighbour search over the
            processes of a ``torch.distributed`` group; every process gets the whole result.

    Returns:
        :class:`ExtractionResult` with ``method="generate_and_filter"``.
    """
    _check_images(samples, "samples")
    _check_images(references, "references")
    _check_pair(samples, references, ("samples", "references"))
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta!r}")
    if isinstance(min_clique, bool) or not isinstance(min_clique, int) or min_clique < 1:
        raise ValueError(f"min_clique must be an int >= 1, got {min_clique!r}")
    if references.shape[0] == 0:
        raise ValueError("references is empty")
    shard = check_shard(shard)
    n = samples.shape[0]
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({n},), got {labels!r:.80}")
        labels = labels.to(samples.device)
    tile_size = resolve_tile_size(samples.shape[-2], samples.shape[-1], tile_size)

    flagged = clique_flags(samples, labels, tau, min_clique, tile_size, max_block_bytes=max_block_bytes, shard=shard)
    records = match_flagged(samples, flagged, references, delta, block_size=block_size, max_block_bytes=max_block_bytes, shard=shard)
    return _clique_result(flagged, records, len(references), {"tau": float(tau), "min_clique": int(min_clique), "delta": float(delta),
                                                             "tile_size": tile_size, "grouped_by_label": labels is not None})


def _clique_result(flagged: Tensor, records: list[ExtractionRecord], num_references: int, params: dict[str, Any]) -> ExtractionResult:
    return ExtractionResult("generate_and_filter", records, int(flagged.sum()), len(flagged), int(num_references), params)


def _calibrated_result(cal: Calibrated, threshold: float, num_references: int, params: dict[str, Any]) -> ExtractionResult:
    hit = cal.score < threshold
    records = _closest_per_train(cal.nearest_index[hit], hit.nonzero().squeeze(1), cal.nearest_l2[hit], cal.score[hit])
    return ExtractionResult("calibrated_l2", records, int(hit.sum()), len(hit), int(num_references),
                            {"threshold": float(threshold), "n_used": int(cal.n), "alpha": float(cal.alpha), **params})


def calibrated_extraction(
    samples: Tensor,
    references: Tensor,
    threshold: float = 1.0,
    n: int = 50,
    alpha: float = 0.5,
    *,
    block_size: int | None = None,
    shard: Shard | None = None,
) -> ExtractionResult:
    """Carlini et al. 2023 §5.1 white-box extraction check with the calibrated l2 (CIFAR-10).

    Every sample is scored against the training set with
    ``l2(x_hat, x) / (alpha * mean l2 to the n nearest training images)`` (n=50, alpha=0.5 in the
    paper) and its nearest training image counts as extracted when the score is below
    ``threshold`` (1 in the paper). Each extracted image's record keeps the closest such sample
    (smallest plain l2) with its score. With fewer than ``n`` training images all are used.

    Args:
        samples: generated images (N, C, H, W) or (N, D) in [0, 1].
        references: training images (M, ...) in [0, 1].
        threshold: extracted when the calibrated score is strictly below it, > 0.
        n: calibration neighbourhood size.
        alpha: calibration factor.
        block_size: passed to :func:`~privdiff.distances.nearest_neighbors`.
        shard: ``(rank, world_size)``: split the neighbour search over processes (every process
            gets the whole result).

    Returns:
        :class:`ExtractionResult` with ``method="calibrated_l2"``.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    cal = calibrated_l2(samples, references, n=n, alpha=alpha, block_size=block_size, shard=shard)
    return _calibrated_result(cal, threshold, len(references), {"n": int(n)})


def by_copies(extracted_indices: Sequence[int] | Tensor, copies: Tensor | Sequence[int]) -> dict[int, dict[str, Any]]:
    """Extraction rate by number of copies in the training set.

    Carlini et al. 2023 find that images duplicated in the training set are extracted far more
    often; this table shows whether planted duplicates are memorized first.

    Args:
        extracted_indices: training indices that were extracted or memorized (repeats count once).
        copies: (M,) integer count of copies of each training image in the training set
            (1 normally, k for an image planted k times, 0 for a member a data defense removed).

    Returns:
        ``{copy_count: {"num_images", "num_extracted", "fraction_extracted"}}`` for each distinct
        copy count, in increasing order, with python ints and floats.
    """
    copies_t = torch.as_tensor(copies)
    if copies_t.dim() != 1 or copies_t.is_floating_point() or copies_t.dtype == torch.bool:
        raise ValueError(f"copies must be a 1-D integer tensor, got dtype {copies_t.dtype} shape {tuple(copies_t.shape)}")
    if copies_t.numel() and int(copies_t.min()) < 0:
        raise ValueError(f"copies must be >= 0, got minimum {int(copies_t.min())}")
    ext = torch.as_tensor(extracted_indices, dtype=torch.long).reshape(-1).cpu()
    m = copies_t.numel()
    if ext.numel() and (int(ext.min()) < 0 or int(ext.max()) >= m):
        raise ValueError(f"extracted indices must be in [0, {m}), got range [{int(ext.min())}, {int(ext.max())}]")
    copies_t = copies_t.cpu()
    hit = torch.zeros(m, dtype=torch.bool)
    hit[ext] = True
    out: dict[int, dict[str, Any]] = {}
    for c in torch.unique(copies_t).tolist():
        mask = copies_t == c
        total = int(mask.sum())
        got = int((hit & mask).sum())
        out[int(c)] = {"num_images": total, "num_extracted": got, "fraction_extracted": got / total}
    return out
