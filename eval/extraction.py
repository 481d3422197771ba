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
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    l2,
    nearest_neighbors,
    resolve_tile_size,
)
from privdiff.shard import Shard, check_shard, gather, rows_of


from .controls import ChanceControl, chance_text, keep_closest
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


# -- the audit plugin ---------------------------------------------------------------------------------

METHODS = ("generate_and_filter", "calibrated_l2")
SPACES = ("pixel", "decoded")


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
    """Both attacks' records (pixel space, and through the decoder for a latent model), their union by group of
    near-copies beside its control, extraction by copy count, the thresholds and the cases."""

    def columns(self) -> list[Column]:
        union = self.summary["union"]
        text = (f"{union['extracted']} ({100 * union['fraction_of_members']:.1f}%)" + chance_text(union.get("control"))
                + lower_bound(self.summary.get("reconstruction_floor")))
        return [Column("extracted", "extracted · chance", "distinct member images extracted (near-copies count once; count, % "
                       "of them), beside what the same attacks flag with held-out images in the members' place, scaled to "
                       "the members (95% interval) and whether the count exceeds it (one-sided Fisher exact test)",
                       union["extracted"], text, Privacy.PRIVACY)]

    def verdict(self) -> str | None:
        union = self.summary["union"]
        return (f"extraction: {union['extracted']} member image{'' if union['extracted'] == 1 else 's'} "
                f"({100 * union['fraction_of_members']:.1f}%){chance_text(union.get('control'))}"
                + lower_bound(self.summary.get("reconstruction_floor")))

    def scalars(self) -> dict[str, float]:
        union = self.summary["union"]
        out = {"extracted": float(union["extracted"]), "extracted_fraction": float(union["fraction_of_members"])}
        control = union.get("control") or {}
        if control.get("expected") is not None:
            out.update(extracted_chance=float(control["expected"]), extracted_above_chance=float(control["excess"]))
        return out

    def notes(self) -> list[str]:
        s = self.summary
        spaces = s.get("spaces", ["pixel"])
        notes = ["Extracted: union of Carlini et al. 2023's generate-and-filter attack and the calibrated-l2 white-box check, "
                 "counted by group of near-copies (members that are near-copies of each other are one image)"
                 + (", each run on pixels and against the members' own decodings (thresholds calibrated on decoded held-out "
                    "images), so that a copy in the model's latent space is confirmed whatever its decoder's floor."
                    if "decoded" in spaces else ".")]
        control = s["union"].get("control")
        if control:
            notes.append("Control (extracted): " + ChanceControl.from_dict(control).sentence())
            for method in METHODS:
                c = (s.get("controls") or {}).get(method)
                if c and c["flagged"] and not c["above_chance"]:
                    notes.append(f"Control ({method}): " + ChanceControl.from_dict(c).sentence())
        floor = floor_note(s.get("reconstruction_floor"))
        if floor:
            notes.append(floor)
        unresolved = [f"{key} ({t['status_text']})" for key, t in (s.get("thresholds") or {}).items() if t.get("status") in ("unresolved", "above")]
        if unresolved:
            notes.append("Thresholds whose held-out flag rate does not show the asked rate: " + "; ".join(unresolved)
                         + ". The control above measures what they flag on these samples.")
        return notes


PUBLISHED = {"tau": 0.15, "delta": 0.15, "calibrated_threshold": 1.0}  # Carlini et al. 2023 (CIFAR-10, 50k images)
ROUND_TRIP_TOLERANCE = 1e-3  # l2 below which a model's decode(encode(x)) is taken to be x (a pixel model: rounding only)


def round_trip(context: AuditContext, which: str, batch_size: int = 256) -> Tensor:
    """``decode(encode(x))`` of the members, the calibration or the held-out images in [0, 1], once per audit.

    A latent model's samples are decodings, so a copy of a member in its latent space is a copy of the member's own
    decoding; comparing samples with these (and calibrating on held-out images passed through the same round trip)
    confirms such copies whatever the decoder's floor.
    """
    if which not in ("members", "calibration", "heldout"):
        raise ValueError(f"round trip of members, calibration or heldout, got {which!r}")

    def compute() -> Tensor:
        images = context.members if which == "members" else getattr(context, which).unit()
        model = context.model
        with torch.no_grad():
            out = [model.decode(model.encode(images[i : i + batch_size].to(model.device))).float().cpu()
                   for i in range(0, len(images), batch_size)]
        return torch.cat(out).clamp(0, 1) if out else images.float()

    return context.memoized(("round trip", which, batch_size), compute)


def space_images(context: AuditContext, which: str, space: str) -> Tensor | None:
    """The members, calibration or held-out images in [0, 1] of a space: as they are (``pixel``) or through the model's
    round trip (``decoded``); None where there are none."""
    if which != "members" and (getattr(context, which) is None or not len(getattr(context, which))):
        return None
    if space == "decoded":
        return round_trip(context, which)
    return context.members if which == "members" else getattr(context, which).unit()


def _floor(context: AuditContext) -> Tensor:
    """(M,) l2 from each member to the model's decoding of it, once per audit."""
    return context.memoized("reconstruction floor", lambda: l2(round_trip(context, "members"), context.members.float()))


def has_decoder(context: AuditContext) -> bool:
    """Whether the model's decoding changes images (a latent model) rather than being the identity (a pixel model)."""
    return bool(len(context.members)) and float(_floor(context).max()) > ROUND_TRIP_TOLERANCE


def reconstruction_floor(context: AuditContext, delta: float, decoded: bool = False, max_listed: int = 20) -> dict[str, Any]:
    """How close the model's output can come to each member: the l2 between a member and the model's decoding of it.

    A latent model generates through its decoder, so a sample that copies a member exactly in latent space decodes
    to ``decode(encode(member))``, not to the member. Where that is farther than ``delta``, no copy of the member can
    be confirmed by pixel l2. With ``decoded`` the samples are also compared with each member's own decoding, where
    such a copy lies at 0: then no member is out of reach. ``unconfirmable`` counts the members neither comparison
    can confirm (an extraction count is a lower bound for them), ``unconfirmable_ids`` names the first ``max_listed``.
    A pixel model's floor is 0.
    """
    d = _floor(context)
    beyond = (d > delta).nonzero().squeeze(1).tolist()
    unreachable = [] if decoded else beyond
    ids = context.data.members.ids
    return {"median_l2": float(d.median()), "max_l2": float(d.max()), "beyond_delta": len(beyond),
            "num_members": len(d), "delta": float(delta), "decoded": decoded, "unconfirmable": len(unreachable),
            "unconfirmable_ids": [ids[i] for i in unreachable[:max_listed]]}


def lower_bound(floor: Mapping[str, Any] | None) -> str:
    """What a count's table text gets where some members can be confirmed in neither space (see the note)."""
    return ", lower bound" if floor and floor.get("unconfirmable", floor.get("beyond_delta")) else ""


def floor_note(floor: Mapping[str, Any] | None) -> str | None:
    """The report's note when some members lie farther from the model's own decoding of them than delta."""
    if not floor or not floor["beyond_delta"]:
        return None
    text = (f"The model's decoder reconstructs the members at l2 {floor['median_l2']:.3g} (median; max {floor['max_l2']:.3g}), "
            f"and {floor['beyond_delta']} of {floor['num_members']} lie farther than delta = {floor['delta']:.3g} from their own "
            "reconstruction: ")
    if floor.get("decoded"):
        return text + ("a copy of those in the model's latent space could not be confirmed on pixels alone, so every sample "
                       "is also compared with the members' own decodings (where such a copy lies at 0) and the counts cover "
                       "every member.")
    listed = ", ".join(floor.get("unconfirmable_ids") or [])
    return text + ("even a perfect copy of those in the model's latent space cannot be confirmed, so the extraction counts "
                   f"(by shared samples and by prompt) are lower bounds for these {floor['beyond_delta']} members"
                   + (f" ({listed}{', ...' if floor['beyond_delta'] > len(floor.get('unconfirmable_ids') or []) else ''})" if listed else "")
                   + ". Leave decoded comparison on (audit.attacks.extraction.init_args.decoded), train the VAE longer "
                   "(model.diffusion.init_args.vae_steps) or on more public images.")


def _tiled_nearest(queries: Tensor, members: Tensor, tile_size: int | None, block: int = 64) -> Tensor:
    """Each query's tiled l2 to its nearest member (the clique attack's edge distance), in blocks."""
    tile = _tile_shape(queries, resolve_tile_size(queries.shape[-2], queries.shape[-1], tile_size))
    out = [_pairwise_tiled(queries[i : i + block], members, tile).min(1).values for i in range(0, len(queries), block)]
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class _SpaceRun:
    """One space's attacks: their results against the members, and per attack the evidence of each member flagged
    and of each held-out image flagged in the members' place (row -> its closest flagged sample's calibrated l2)."""

    results: list[ExtractionResult]
    evidence: dict[str, dict[int, float]]
    control: dict[str, dict[int, float]]


class ExtractionAttack(AuditPlugin):
    """Carlini et al. 2023's generate-and-filter attack and calibrated-l2 check, against the members, with a control.

    Every threshold left at None is taken from the data (``privdiff.eval.thresholds``): the largest
    value at which at most ``flag_rate`` of the held-out calibration images would be flagged against
    the members; a number sets it by hand. The published values (tau = delta = 0.15, calibrated
    l2 < 1) are reported beside, with their false-flag rate on these data.

    Every count stands beside its control (:mod:`privdiff.eval.controls`): the same samples, thresholds and cliques
    with the evaluation held-out images (not those that set the thresholds) in the members' place. For a model with a
    decoder (a latent model) both attacks also run against each member's own decoding, with thresholds calibrated on
    held-out images passed through the same round trip (``decoded``); a member counts once whichever space found it.

    Args:
        tau: tiled-l2 edge threshold of the clique of generations (§4.2).
        min_clique: clique size that flags its members.
        delta: plain-l2 threshold that matches a flagged sample to a member.
        tile_size: tile side of the tiled l2 (None: see :func:`generate_and_filter`).
        calibrated_threshold, calibrated_n, calibrated_alpha: the calibrated-l2 check (§5.1).
        flag_rate: share of real held-out images a calibrated threshold may flag (None: the audit's).
        decoded: for a model with a decoder, also compare with the members' own decodings.
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
        decoded: bool = True,
        max_cases: int = 16,
    ) -> None:
        self.tau, self.min_clique, self.delta, self.tile_size = tau, min_clique, delta, tile_size
        self.calibrated_threshold, self.calibrated_n, self.calibrated_alpha = calibrated_threshold, calibrated_n, calibrated_alpha
        self.flag_rate, self.decoded, self.max_cases = flag_rate, decoded, max_cases

    def spaces(self, context: AuditContext) -> list[str]:
        """``["pixel"]``, and ``"decoded"`` where the model has a decoder and ``decoded`` is on."""
        return ["pixel", "decoded"] if self.decoded and has_decoder(context) else ["pixel"]

    def thresholds(self, context: AuditContext, space: str = "pixel") -> dict[str, Threshold]:
        """tau, delta and the calibrated-l2 threshold of one space: given, or calibrated on the calibration images.

        In the ``decoded`` space the members, the calibration and the held-out images are all passed through the
        model's round trip. Computed once per audit for these settings (prompt extraction and detection ask for them
        too); each caller gets its own copies.
        """
        if space not in SPACES:
            raise ValueError(f"extraction space must be one of {SPACES}, got {space!r}")
        rate = self.flag_rate if self.flag_rate is not None else context.flag_rate
        key = ("extraction thresholds", space, self.tau, self.delta, self.calibrated_threshold, rate, self.tile_size,
               self.calibrated_n, self.calibrated_alpha)
        return copy.deepcopy(context.memoized(key, lambda: self._thresholds(context, rate, space)))

    def _thresholds(self, context: AuditContext, rate: float, space: str) -> dict[str, Threshold]:
        from privdiff.distances import nearest_two

        members, shard = space_images(context, "members", space), context.shard

        def scores(x: Tensor) -> dict[str, Tensor]:
            d1, _, _ = nearest_two(x, members, shard=shard)
            cal = calibrated_l2(x, members, n=self.calibrated_n, alpha=self.calibrated_alpha, shard=shard).score
            return {"tau": _tiled_nearest(x, members, self.tile_size), "delta": d1, "calibrated_threshold": cal}

        where = "" if space == "pixel" else ", against the members' decodings"
        criteria = {"tau": (f"tiled l2 <= tau (clique edge{where})", True), "delta": (f"l2 <= delta (match to a member{where})", True),
                    "calibrated_threshold": (f"calibrated l2 < threshold{where}", False)}
        calibration_images = space_images(context, "calibration", space)
        calibration = scores(calibration_images) if calibration_images is not None else None
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
        heldout = space_images(context, "heldout", space)
        if heldout is not None:
            for key, held in scores(heldout).items():
                out[key].evaluate(held)
        return out

    def _attack(self, context: AuditContext, space: str, found: Mapping[str, Threshold]) -> _SpaceRun:
        """Both attacks in one space, and the held-out images each flags with the same samples and thresholds."""
        samples, shard = context.samples, context.shard
        members, heldout = space_images(context, "members", space), space_images(context, "heldout", space)
        tau, delta, cal_t = (found[k].value for k in ("tau", "delta", "calibrated_threshold"))
        flags = clique_flags(samples, context.sample_labels, tau, self.min_clique, self.tile_size, shard=shard)
        gf = _clique_result(flags, match_flagged(samples, flags, members, delta, shard=shard), len(members),
                            {"tau": tau, "min_clique": self.min_clique, "delta": delta, "space": space,
                             "tile_size": resolve_tile_size(samples.shape[-2], samples.shape[-1], self.tile_size)})
        cal = calibrated_l2(samples, members, n=self.calibrated_n, alpha=self.calibrated_alpha, shard=shard)
        cal_result = _calibrated_result(cal, cal_t, len(members), {"n": self.calibrated_n, "space": space})

        # Evidence for the rank test: a pair's l2 over the sample's scale (its calibrated l2), whichever attack flagged
        # it. Plain l2 would rank a patch of dark sky, close to every dark member by chance, above a real copy.
        def evidence(records: list[ExtractionRecord]) -> dict[int, float]:
            return keep_closest({}, ((r.train_index, r.distance / max(float(cal.scale[r.sample_index]), 1e-12)) for r in records))

        control: dict[str, dict[int, float]] = {m: {} for m in METHODS}
        if heldout is not None:
            control["generate_and_filter"] = evidence(match_flagged(samples, flags, heldout, delta, shard=shard))
            # The calibrated test against the members is l2 < threshold x the sample's scale (its neighbourhood among the
            # members); a held-out image passes in a member's place when it is the sample's nearest and within that radius.
            nb = nearest_neighbors(samples, heldout, k=1, shard=shard)
            passed = nb.distances[:, 0] < cal_t * cal.scale
            control["calibrated_l2"] = evidence(_closest_per_train(nb.indices[passed, 0], passed.nonzero().squeeze(1), nb.distances[passed, 0]))
        return _SpaceRun([gf, cal_result], {r.method: evidence(r.records) for r in (gf, cal_result)}, control)

    def run(self, context: AuditContext) -> ExtractionReport:
        from .memorization import by_copies

        samples, ids = context.samples, context.data.members.ids
        groups = context.data.group_of()
        reps = sorted(set(groups.tolist()))
        num_control = len(context.heldout) if context.heldout is not None else 0
        spaces = self.spaces(context)
        found = {space: self.thresholds(context, space) for space in spaces}
        summary: dict[str, Any] = {
            "spaces": spaces, "thresholds": {k: t.to_dict() for k, t in found["pixel"].items()},
            "reconstruction_floor": reconstruction_floor(context, found["pixel"]["delta"].value, decoded="decoded" in spaces),
        }
        hits: dict[str, dict[int, float]] = {m: {} for m in METHODS}  # member row -> its evidence (see _SpaceRun)
        control: dict[str, dict[int, float]] = {m: {} for m in METHODS}
        labelled: list[tuple[ExtractionRecord, str]] = []
        if len(samples):
            for space in spaces:
                ran = self._attack(context, space, found[space])
                where = summary if space == "pixel" else summary.setdefault(
                    "decoded", {"thresholds": {k: t.to_dict() for k, t in found[space].items()}})
                where.update({r.method: _summary(r, ids) for r in ran.results})
                for method, rows in ran.evidence.items():
                    keep_closest(hits[method], rows.items())
                for r in ran.results:
                    labelled += [(rec, r.method if space == "pixel" else f"{r.method} (decoded)") for rec in r.records]
                for method, rows in ran.control.items():
                    keep_closest(control[method], rows.items())
        hits["union"] = keep_closest({}, ((i, v) for m in METHODS for i, v in hits[m].items()))
        control["union"] = keep_closest({}, ((i, v) for m in METHODS for i, v in control[m].items()))
        by_group = {key: keep_closest({}, ((int(groups[i]), v) for i, v in rows.items())) for key, rows in hits.items()}
        chance = {key: ChanceControl.of_evidence(key, by_group[key], len(reps), control[key], num_control) for key in hits}

        summary["controls"] = {m: chance[m].to_dict() for m in METHODS}
        extracted_members = sorted(hits["union"])
        extracted_groups = sorted(by_group["union"])
        closest_chance = min(control["union"].values(), default=math.inf)
        summary["union"] = {
            "extracted": len(extracted_groups), "fraction_of_members": len(extracted_groups) / len(reps),
            "num_groups": len(reps), "ids": [ids[i] for i in extracted_groups], "member_ids": [ids[i] for i in extracted_members],
            "control": chance["union"].to_dict(),
            "control_ids": [context.heldout.ids[i] for i in sorted(control["union"])] if num_control else [],
            # the members a flagged sample lies closer to than to any held-out image: the strongest evidence of copying
            "beyond_control_ids": sorted(ids[g] for g, v in by_group["union"].items() if v < closest_chance) if num_control else [],
        }
        copies = context.data.group_copies()[reps]
        position = {g: i for i, g in enumerate(reps)}
        summary["by_copies"] = {str(k): v for k, v in by_copies([position[g] for g in extracted_groups], copies).items()}
        rates = {f"extraction {k}": t.heldout_rate for k, t in found["pixel"].items() if t.heldout_rate is not None}
        rates.update({f"extraction {k} (decoded)": t.heldout_rate for k, t in found.get("decoded", {}).items() if t.heldout_rate is not None})
        grid = self._cases(samples, context.members, ids, labelled, context.data.group_copies(), context.data.members.captions)
        return ExtractionReport(summary, rates, grid)

    def _cases(self, samples: Tensor, members: Tensor, ids: list[str], labelled: list[tuple[ExtractionRecord, str]],
               copies: Tensor, captions: list[str] | None = None) -> Cases:
        """The closest extracted pair of each extracted member, closest first, at most ``max_cases``."""
        best: dict[int, tuple[ExtractionRecord, str]] = {}
        for r, method in labelled:
            if r.train_index not in best or r.distance < best[r.train_index][0].distance:
                best[r.train_index] = (r, method)
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
