"""Training-data extraction attacks of Carlini et al. 2023 on generated samples.

Carlini, Hayes, Nasr et al., "Extracting Training Data from Diffusion Models" (USENIX Security
2023, arXiv:2301.13188):

- :func:`generate_and_filter`, the black-box generate-and-filter attack (§4.2): generations that
  form a large clique of near-identical images under tiled l2 are likely memorized; the flagged
  ones are then checked against the training set with plain l2.
- :func:`calibrated_extraction`, the white-box CIFAR-10 check (§5.1): every generation against the
  training set with the calibrated l2, extracted when the score is below 1.

Both are pure tensor functions over images in [0, 1] and return an :class:`ExtractionResult`
with one record per extracted training image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from privdiff.distances import (
    DEFAULT_BLOCK_BYTES,
    _check_images,
    _check_pair,
    _pairwise_tiled,
    _tile_shape,
    calibrated_l2,
    l2,
    nearest_neighbors,
    resolve_tile_size,
)
from privdiff.shard import Shard, check_shard, gather, rows_of

from privdiff.membership import ImageTable

from .plugin import AuditContext, AuditPlugin, Cases, Column, Privacy, SummaryResult
from .thresholds import Threshold, calibrate, given

__all__ = ["ExtractionRecord", "ExtractionResult", "calibrated_extraction", "generate_and_filter"]


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
    tile = _tile_shape(samples, tile_size)

    flagged = torch.zeros(n, dtype=torch.bool, device=samples.device)
    groups = [None] if labels is None else torch.unique(labels).tolist()
    for g in groups:
        idx = torch.arange(n, device=samples.device) if g is None else (labels == g).nonzero().squeeze(1)
        if idx.numel() < min_clique:
            continue
        adj = _adjacency(samples[idx], float(tau), tile, max_block_bytes, shard)
        flagged[idx[_clique_members(adj, min_clique)]] = True

    sample_idx = flagged.nonzero().squeeze(1)
    records: list[ExtractionRecord] = []
    if sample_idx.numel():
        nb = nearest_neighbors(
            samples[sample_idx], references, k=1, block_size=block_size, max_block_bytes=max_block_bytes, shard=shard
        )
        dist, train_idx = nb.distances[:, 0], nb.indices[:, 0]
        hit = dist <= delta
        records = _closest_per_train(train_idx[hit], sample_idx[hit], dist[hit])
    return ExtractionResult(
        method="generate_and_filter",
        records=records,
        num_samples_flagged=int(sample_idx.numel()),
        num_samples=int(n),
        num_references=int(references.shape[0]),
        params={
            "tau": float(tau),
            "min_clique": int(min_clique),
            "delta": float(delta),
            "tile_size": tile_size,
            "grouped_by_label": labels is not None,
        },
    )


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
    hit = cal.score < threshold
    sample_idx = hit.nonzero().squeeze(1)
    records = _closest_per_train(cal.nearest_index[hit], sample_idx, cal.nearest_l2[hit], cal.score[hit])
    return ExtractionResult(
        method="calibrated_l2",
        records=records,
        num_samples_flagged=int(sample_idx.numel()),
        num_samples=int(samples.shape[0]),
        num_references=int(references.shape[0]),
        params={"threshold": float(threshold), "n": int(n), "n_used": int(cal.n), "alpha": float(alpha)},
    )


# -- the audit plugin ---------------------------------------------------------------------------------


def _summary(res: ExtractionResult, ids: list[str]) -> dict[str, Any]:
    return {
        "extracted": len(res.extracted_indices),
        "fraction_of_members": len(res.extracted_indices) / len(ids),
        "num_samples_flagged": res.num_samples_flagged,
        "records": [
            {"id": ids[r.train_index], "sample": r.sample_index, "distance": r.distance}
            for r in sorted(res.records, key=lambda r: r.distance)
        ],
        "params": res.params,
    }


@dataclass
class ExtractionReport(SummaryResult):
    """Both attacks' records, their union by group of near-copies, extraction by copy count, the thresholds and the cases."""

    def columns(self) -> list[Column]:
        union = self.summary["union"]
        text = f"{union['extracted']} ({100 * union['fraction_of_members']:.1f}%)" + lower_bound(self.summary.get("reconstruction_floor"))
        return [Column("extracted", "extracted", "distinct member images extracted (near-copies count once; count, % of them; "
                       "a lower bound where the model's decoder cannot come within delta of some members)",
                       union["extracted"], text, Privacy.PRIVACY)]

    def scalars(self) -> dict[str, float]:
        union = self.summary["union"]
        return {"extracted": float(union["extracted"]), "extracted_fraction": float(union["fraction_of_members"])}

    def notes(self) -> list[str]:
        notes = ["Extracted: union of Carlini et al. 2023's generate-and-filter attack and the calibrated-l2 white-box check, "
                 "counted by group of near-copies (members that are near-copies of each other are one image)."]
        floor = floor_note(self.summary.get("reconstruction_floor"))
        if floor:
            notes.append(floor)
        chance = self.summary["union"].get("chance_flags_per_criterion", 0)
        if chance >= 0.5:
            notes.append(
                f"A threshold that flags a share r of real held-out images flags about r x N of N samples that copy nothing: "
                f"here up to {chance:.1f} of the samples per criterion. The generate-and-filter attack needs a clique of "
                "near-identical samples as well, so its extractions are far less exposed to this; look at the cases grid."
            )
        return notes


PUBLISHED = {"tau": 0.15, "delta": 0.15, "calibrated_threshold": 1.0}  # Carlini et al. 2023 (CIFAR-10, 50k images)


def reconstruction_floor(context: AuditContext, delta: float, batch_size: int = 256, max_members: int = 1024) -> dict[str, Any]:
    """How close the model's output can come to each member: the l2 between a member and the model's decoding of it.

    A latent model generates through its decoder, so a sample that copies a member exactly in latent space decodes
    to ``decode(encode(member))``, not to the member. Where that is farther than ``delta``, no copy of the member can
    be confirmed by l2: an extraction count is then a lower bound, and 0 says nothing. (Measured 2026-12-02 on
    crops of natural photographs: a VAE reconstructing at l2 0.059 against delta 0.023, so 0 of 4 planted pairs could
    be confirmed.) A pixel model's floor is 0. The first ``max_members`` members are checked (an encode and a decode
    each: a Stable Diffusion VAE on 50k images would cost more than the check is worth), once per audit.
    """
    def distances() -> Tensor:
        model, members = context.model, context.members[:max_members]
        with torch.no_grad():
            decoded = torch.cat([model.decode(model.encode(members[i : i + batch_size].to(model.device))).float().cpu()
                                 for i in range(0, len(members), batch_size)])
        return l2(decoded.clamp(0, 1), members.float())

    d = context.memoized(("reconstruction floor", batch_size, max_members), distances)
    return {"median_l2": float(d.median()), "max_l2": float(d.max()), "beyond_delta": int((d > delta).sum()),
            "num_members": len(d), "delta": float(delta)}


def lower_bound(floor: Mapping[str, Any] | None) -> str:
    """What a count's table text gets where some members lie beyond delta from their own decoding (see the note)."""
    return ", lower bound" if floor and floor["beyond_delta"] else ""


def floor_note(floor: Mapping[str, Any] | None) -> str | None:
    """The report's warning when some members lie farther from the model's own decoding of them than delta."""
    if not floor or not floor["beyond_delta"]:
        return None
    return (f"The model's decoder reconstructs the members at l2 {floor['median_l2']:.3g} (median; max {floor['max_l2']:.3g}), "
            f"and {floor['beyond_delta']} of {floor['num_members']} checked lie farther than delta = {floor['delta']:.3g} from their own "
            "reconstruction: even a perfect copy of those in the model's latent space cannot be confirmed, so the "
            "extraction counts (by shared samples and by prompt) are lower bounds there. Train the VAE longer "
            "(model.diffusion.init_args.vae_steps) or on more public images.")


def _tiled_nearest(queries: Tensor, members: Tensor, tile_size: int | None, block: int = 64) -> Tensor:
    """Each query's tiled l2 to its nearest member (the clique attack's edge distance), in blocks."""
    tile = _tile_shape(queries, resolve_tile_size(queries.shape[-2], queries.shape[-1], tile_size))
    out = [_pairwise_tiled(queries[i : i + block], members, tile).min(1).values for i in range(0, len(queries), block)]
    return torch.cat(out) if out else torch.empty(0)


class ExtractionAttack(AuditPlugin):
    """Carlini et al. 2023's generate-and-filter attack and calibrated-l2 check, against the members.

    Every threshold left at None is taken from the data (``privdiff.eval.thresholds``): the largest
    value at which at most ``flag_rate`` of the held-out calibration images would be flagged against
    the members; a number sets it by hand. The published values (tau = delta = 0.15, calibrated
    l2 < 1) are reported beside, with their false-flag rate on these data.

    Args:
        tau: tiled-l2 edge threshold of the clique of generations (§4.2).
        min_clique: clique size that flags its members.
        delta: plain-l2 threshold that matches a flagged sample to a member.
        tile_size: tile side of the tiled l2 (None: see :func:`generate_and_filter`).
        calibrated_threshold, calibrated_n, calibrated_alpha: the calibrated-l2 check (§5.1).
        flag_rate: share of real held-out images a calibrated threshold may flag (None: the audit's).
        max_cases: extracted cases kept (on local disk) for the report's grid.
    """

    name = "extraction"

    def __init__(
        self,
        tau: float | None = None,
        min_clique: int = 10,
        delta: float | None = None,
        tile_size: int | None = None,
        calibrated_threshold: float | None = None,
        calibrated_n: int = 50,
        calibrated_alpha: float = 0.5,
        flag_rate: float | None = None,
        max_cases: int = 16,
    ) -> None:
        self.tau, self.min_clique, self.delta, self.tile_size = tau, min_clique, delta, tile_size
        self.calibrated_threshold, self.calibrated_n, self.calibrated_alpha = calibrated_threshold, calibrated_n, calibrated_alpha
        self.flag_rate, self.max_cases = flag_rate, max_cases

    def thresholds(self, context: AuditContext) -> dict[str, Threshold]:
        """tau, delta and the calibrated-l2 threshold: given, or calibrated on the calibration images.

        Computed once per audit for these settings (prompt extraction and detection ask for them too); each caller
        gets its own copies.
        """
        rate = self.flag_rate if self.flag_rate is not None else context.flag_rate
        key = ("extraction thresholds", self.tau, self.delta, self.calibrated_threshold, rate, self.tile_size,
               self.calibrated_n, self.calibrated_alpha)
        return copy.deepcopy(context.memoized(key, lambda: self._thresholds(context, rate)))

    def _thresholds(self, context: AuditContext, rate: float) -> dict[str, Threshold]:
        from privdiff.distances import nearest_two

        members, shard = context.members, context.shard

        def scores(table: ImageTable) -> dict[str, Tensor]:
            x = table.unit()
            d1, _, _ = nearest_two(x, members, shard=shard)
            cal = calibrated_l2(x, members, n=self.calibrated_n, alpha=self.calibrated_alpha, shard=shard).score
            return {"tau": _tiled_nearest(x, members, self.tile_size), "delta": d1, "calibrated_threshold": cal}

        criteria = {"tau": ("tiled l2 <= tau (clique edge)", True), "delta": ("l2 <= delta (match to a member)", True),
                    "calibrated_threshold": ("calibrated l2 < threshold", False)}
        calibration = scores(context.calibration) if context.calibration is not None and len(context.calibration) else None
        out = {}
        for key, (criterion, inclusive) in criteria.items():
            value = getattr(self, key)
            if value is not None:
                out[key] = given(criterion, value, inclusive=inclusive, published=PUBLISHED[key])
            elif calibration is None:
                raise ValueError(
                    f"extraction {key} is calibrated on held-out images, and there are none: give data.num_heldout > 0 "
                    f"(or set audit.attacks.extraction.{key} to a number)"
                )
            else:
                out[key] = calibrate(criterion, calibration[key], rate, inclusive=inclusive, published=PUBLISHED[key])
        if context.heldout is not None and len(context.heldout):
            for key, held in scores(context.heldout).items():
                out[key].evaluate(held)
        return out

    def run(self, context: AuditContext) -> ExtractionReport:
        from .memorization import by_copies

        samples, members, ids, shard = context.samples, context.members, context.data.members.ids, context.shard
        found = self.thresholds(context)
        tau, delta, cal_t = (found[k].value for k in ("tau", "delta", "calibrated_threshold"))
        summary: dict[str, Any] = {"thresholds": {k: t.to_dict() for k, t in found.items()},
                                   "reconstruction_floor": reconstruction_floor(context, delta)}
        results = []
        if len(samples):
            gf = generate_and_filter(samples, members, context.sample_labels, tau=tau, min_clique=self.min_clique,
                                     delta=delta, tile_size=self.tile_size, shard=shard)
            cal = calibrated_extraction(samples, members, threshold=cal_t, n=self.calibrated_n, alpha=self.calibrated_alpha, shard=shard)
            results = [gf, cal]
            summary.update({r.method: _summary(r, ids) for r in results})
        groups = context.data.group_of()
        reps = sorted(set(groups.tolist()))
        extracted_members = sorted({i for r in results for i in r.extracted_indices})
        extracted_groups = sorted({int(groups[i]) for i in extracted_members})
        summary["union"] = {
            "extracted": len(extracted_groups), "fraction_of_members": len(extracted_groups) / len(reps),
            # a criterion that flags a share r of novel real images flags about r * N of N novel samples by chance
            "chance_flags_per_criterion": max(t.target_rate or 0.0 for t in found.values()) * len(samples) if found else 0.0,
            "num_groups": len(reps), "ids": [ids[i] for i in extracted_groups], "member_ids": [ids[i] for i in extracted_members],
        }
        copies = context.data.group_copies()[reps]
        position = {g: i for i, g in enumerate(reps)}
        summary["by_copies"] = {str(k): v for k, v in by_copies([position[g] for g in extracted_groups], copies).items()}
        rates = {f"extraction {k}": t.heldout_rate for k, t in found.items() if t.heldout_rate is not None}
        grid = self._cases(samples, members, ids, results, context.data.group_copies(), context.data.members.captions)
        return ExtractionReport(summary, rates, grid)

    def _cases(self, samples: Tensor, members: Tensor, ids: list[str], results: list[ExtractionResult], copies: Tensor,
               captions: list[str] | None = None) -> Cases:
        """The closest extracted pair of each extracted member, closest first, at most ``max_cases``."""
        best: dict[int, tuple[ExtractionRecord, str]] = {}
        for res in results:
            for r in res.records:
                if r.train_index not in best or r.distance < best[r.train_index][0].distance:
                    best[r.train_index] = (r, res.method)
        chosen = sorted(best.values(), key=lambda rm: rm[0].distance)[: self.max_cases]
        shape = (0, *members.shape[1:])
        return Cases(
            samples=torch.stack([samples[r.sample_index] for r, _ in chosen]) if chosen else torch.empty(shape),
            nearest=members[[r.train_index for r, _ in chosen]] if chosen else torch.empty(shape),
            distance=torch.tensor([float(r.distance) for r, _ in chosen]),
            member_ids=[ids[r.train_index] for r, _ in chosen],
            flagged_by=[m for _, m in chosen],
            copies=[int(copies[r.train_index]) for r, _ in chosen],
            captions=[captions[r.train_index] for r, _ in chosen] if captions is not None else [],
        )

    @classmethod
    def figures(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any]]:
        """Share of member images extracted by how many training rows their group had: bars, one per setting.

        Bars per copy count (measured values only: no line implies anything between 1 and 10 copies),
        side by side so that no setting hides another; each bar says how many images it stands for.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_run = {name: (audit.get(cls.name) or {}).get("by_copies") or {} for name, audit in runs.items()}
        counts = sorted({int(k) for by in by_run.values() for k in by})
        if not counts:
            return []
        width = 0.8 / max(1, len(by_run))
        fig, ax = plt.subplots(figsize=(1.3 + 1.2 * len(counts) + 0.3 * len(by_run), 3.6), layout="constrained")
        for i, (name, by) in enumerate(by_run.items()):
            for j, c in enumerate(counts):
                if str(c) not in by:
                    continue
                v = by[str(c)]
                x = j + (i - (len(by_run) - 1) / 2) * width
                ax.bar(x, max(v["fraction_extracted"], 0.004), width * 0.95, color=f"C{i}", label=name if j == 0 or str(counts[0]) not in by else None)
                ax.text(x, v["fraction_extracted"] + 0.02, f"{v['num_extracted']}/{v['num_images']}", ha="center", fontsize=6.5)
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel("training rows of the image (its copies)")
        ax.set_ylabel("fraction extracted")
        ax.set_ylim(0, 1.12)
        ax.grid(alpha=0.3, axis="y")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")
        ax.set_title("memorization vs duplication")
        return [("memorization vs copies", fig)]
