"""Memorization metrics: Gu et al. 2023's nearest-neighbour ratio and extraction by duplicate count.

Gu, Du, Pang, Li, Lin, Wang, "On Memorization in Diffusion Models" (arXiv:2310.02664, TMLR 2025),
following Yoon et al. 2023, call a generated image memorized when its l2 distance to the nearest
training image is less than 1/3 of its distance to the second-nearest one. Distances are the l2 of
Carlini et al. 2023 (root mean squared difference on [0, 1] pixels); the ratio is scale-free, so
the normalisation does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from privdiff.distances import nearest_neighbors, nearest_two
from privdiff.shard import Shard

from .controls import ChanceControl, keep_closest
from .plugin import AuditContext, AuditPlugin, Column, Privacy, SummaryResult
from .sample_stream import SampleReduction, concat
from .thresholds import Threshold, calibrate, given

PUBLISHED = 1 / 3  # Gu et al. 2023

__all__ = ["MemorizationResult", "NNRatioMemorization", "memorization_ratio", "nn_ratio"]


def _ratio(d1: Tensor, d2: Tensor) -> Tensor:
    # d2 == 0 forces d1 == 0: the sample is an exact copy; call the ratio 0 rather than 0/0.
    return torch.where(d2 > 0, d1 / d2.clamp(min=torch.finfo(d2.dtype).tiny), torch.zeros_like(d1))


def nn_ratio(samples: Tensor, references: Tensor, block_size: int | None = None) -> Tensor:
    """Gu et al. 2023 memorization ratio ``l2(x, NN1(x)) / l2(x, NN2(x))`` per sample.

    The reference set should hold each distinct training image once (deduplicate it and pass
    the multiplicities to :func:`privdiff.eval.carlini.by_copies`): with an exact duplicate the second-nearest image is
    the same picture and the ratio of its copies is about 1. Where both distances are 0 the
    ratio is 0 (an exact copy).

    Args:
        samples: generated images (N, C, H, W) or (N, D) in [0, 1].
        references: training images (M, ...) in [0, 1], M >= 2.
        block_size: passed to :func:`~privdiff.distances.nearest_neighbors`.

    Returns:
        Tensor (N,) in [0, 1]; memorized when below 1/3.
    """
    if references.shape[0] < 2:
        raise ValueError(f"the nearest-neighbour ratio needs at least 2 references, got {references.shape[0]}")
    d1, d2, _ = nearest_two(samples, references, block_size=block_size)
    return _ratio(d1, d2)


@dataclass
class MemorizationResult:
    """Outcome of :func:`memorization_ratio`.

    Attributes:
        threshold: a sample is memorized when its ratio is below it (1/3 in Gu et al. 2023).
        ratio: (N,) nearest / second-nearest training l2 per sample.
        nearest_index: (N,) int64 index of each sample's nearest training image.
        nearest_l2: (N,) l2 to it.
        memorized: (N,) bool, ``ratio < threshold``.
        matched_indices: sorted unique training indices that some memorized sample copies.
        num_references: size of the training set.
    """

    threshold: float
    ratio: Tensor
    nearest_index: Tensor
    nearest_l2: Tensor
    memorized: Tensor
    matched_indices: list[int]
    num_references: int

    @property
    def num_samples(self) -> int:
        return int(self.ratio.shape[0])

    @property
    def num_memorized(self) -> int:
        return int(self.memorized.sum())

    @property
    def fraction_memorized(self) -> float:
        """Fraction of samples that are memorized (0 for no samples)."""
        return self.num_memorized / self.num_samples if self.num_samples else 0.0

    @property
    def num_matched(self) -> int:
        """Distinct training images copied by at least one memorized sample."""
        return len(self.matched_indices)

    @property
    def fraction_matched(self) -> float:
        """``num_matched`` as a fraction of the training set."""
        return self.num_matched / self.num_references if self.num_references else 0.0

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """JSON-able summary; ``per_sample=True`` adds the per-sample lists."""
        out: dict[str, Any] = {
            "threshold": float(self.threshold),
            "num_samples": self.num_samples,
            "num_memorized": self.num_memorized,
            "fraction_memorized": float(self.fraction_memorized),
            "num_references": int(self.num_references),
            "num_matched": self.num_matched,
            "fraction_matched": float(self.fraction_matched),
            "matched_indices": [int(i) for i in self.matched_indices],
        }
        if per_sample:
            out["ratio"] = self.ratio.tolist()
            out["nearest_index"] = self.nearest_index.tolist()
            out["nearest_l2"] = self.nearest_l2.tolist()
        return out


def memorization_ratio(
    samples: Tensor,
    references: Tensor,
    threshold: float = 1 / 3,
    *,
    block_size: int | None = None,
    shard: Shard | None = None,
) -> MemorizationResult:
    """Gu et al. 2023 memorization: samples whose nearest / second-nearest training l2 < threshold.

    See :func:`nn_ratio` for the ratio and why ``references`` should be deduplicated.

    Args:
        samples: generated images (N, C, H, W) or (N, D) in [0, 1].
        references: training images (M, ...) in [0, 1], M >= 2.
        threshold: in (0, 1]; 1/3 in the paper.
        block_size: passed to :func:`~privdiff.distances.nearest_neighbors`.
        shard: ``(rank, world_size)``: split the neighbour search over processes (see
            :func:`~privdiff.distances.nearest_neighbors`); every process gets the whole result.

    Returns:
        :class:`MemorizationResult` with the fraction of memorized samples, the per-sample ratio
        and nearest index, and the distinct training images they copy.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if references.shape[0] < 2:
        raise ValueError(f"the nearest-neighbour ratio needs at least 2 references, got {references.shape[0]}")
    d1, d2, idx = nearest_two(samples, references, block_size=block_size, shard=shard)
    ratio = _ratio(d1, d2)
    memorized = ratio < threshold
    matched = torch.unique(idx[memorized]).tolist()
    return MemorizationResult(
        threshold=float(threshold),
        ratio=ratio,
        nearest_index=idx,
        nearest_l2=d1,
        memorized=memorized,
        matched_indices=[int(i) for i in matched],
        num_references=int(references.shape[0]),
    )



# -- the audit plugin ---------------------------------------------------------------------------------


@dataclass
class MemorizationReport(SummaryResult):
    """Gu et al. 2023's memorized share of the samples, and how often real held-out images pass the ratio test."""

    def columns(self) -> list[Column]:
        value = self.summary.get("fraction_memorized")
        text = "—" if value is None else f"{value:.3g}"
        control = self.summary.get("control")
        if control:
            text += f" · {control['flagged']} image{'' if control['flagged'] == 1 else 's'} · {control['verdict_text']}"
        return [Column("nn_memorized", "NN-ratio mem.", "fraction of samples whose nearest member is much closer than the second "
                       "nearest (Gu et al. 2023; threshold from the data); the member images they copy, and whether that "
                       "exceeds what the same test gives with held-out images in the members' place (see the notes)",
                       value, text, Privacy.PRIVACY)]

    def scalars(self) -> dict[str, float]:
        return {} if "fraction_memorized" not in self.summary else {"nn_ratio_memorized": float(self.summary["fraction_memorized"])}

    def notes(self) -> list[str]:
        notes = ["NN-ratio: Gu et al. 2023 (nearest member / nearest member of another group below a threshold taken from the held-out images; the paper's is 1/3)."]
        control = self.summary.get("control")
        if control:
            notes.append("Control (NN-ratio): " + ChanceControl.from_dict(control).sentence())
        return notes


def grouped_ratio(samples: Tensor, members: Tensor, groups: Tensor, shard: Shard | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gu et al.'s ratio with near-copies as one image: nearest member / nearest member of *another* group.

    Two files of one picture are one training image: the second-nearest image must not be the
    other copy (its ratio would be ~1 and no copy of it could ever be flagged). Returns (ratio,
    nearest member index, nearest l2), each (N,).
    """
    from privdiff.distances import nearest_neighbors

    sizes = torch.bincount(groups)
    k = min(len(members), int(sizes.max()) + 1)
    nb = nearest_neighbors(samples, members, k=k, shard=shard)
    d, idx = nb.distances, nb.indices
    other = groups.to(idx.device)[idx] != groups.to(idx.device)[idx[:, :1]]
    first_other = torch.where(other.any(1), other.float().argmax(1), torch.full_like(idx[:, 0], k - 1))
    d2 = d.gather(1, first_other[:, None])[:, 0]
    return _ratio(d[:, 0], d2), idx[:, 0], d[:, 0]


@dataclass
class _Nearest(SampleReduction):
    """Per sample: the grouped ratio, the nearest member and its l2, and the nearest held-out image and its l2."""

    members: Tensor
    groups: Tensor
    heldout: Tensor | None
    shard: Shard | None

    def update(self, images: Tensor, labels: Tensor | None, first: int) -> dict[str, Tensor]:
        if not len(images):  # every sample of the shard rejected by a generation-side defense
            return {}
        ratio, nearest, d1 = grouped_ratio(images, self.members, self.groups, self.shard)
        out = {"ratio": ratio, "nearest": nearest, "d1": d1}
        if self.heldout is not None:
            nb = nearest_neighbors(images, self.heldout, k=1, shard=self.shard)
            out.update(heldout_l2=nb.distances[:, 0], heldout=nb.indices[:, 0])
        return out

    def merge(self, shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        shards = [s for s in shards if s]
        return {key: concat(shards, key) for key in shards[0]} if shards else {}


class NNRatioMemorization(AuditPlugin):
    """Share of samples memorized by Gu et al. 2023's nearest / second-nearest member ratio.

    Near-copies among the members (``AuditData.groups``) count as one image. The threshold is taken
    from the data when None: the largest ratio at which at most ``flag_rate`` of the held-out
    calibration images would pass; the published 1/3 is reported beside.

    Args:
        threshold: memorized below this ratio (None: calibrated; the paper's is 1/3).
        flag_rate: share of real held-out images the calibrated threshold may flag (None: the audit's).
    """

    name = "memorization"

    def __init__(self, threshold: float | None = None, flag_rate: float | None = None) -> None:
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"memorization threshold must be in (0, 1], got {threshold!r}")
        self.threshold, self.flag_rate = threshold, flag_rate

    def reduction(self, context: AuditContext) -> SampleReduction | None:
        if len(context.members) < 2 or len(set(context.data.group_of().tolist())) < 2:
            return None  # no ratio to take (run says so)
        heldout = context.heldout.unit() if context.heldout is not None and len(context.heldout) else None
        return _Nearest(context.members, context.data.group_of(), heldout, context.shard)

    def run(self, context: AuditContext) -> MemorizationReport:
        members, groups = context.members, context.data.group_of()
        summary: dict[str, Any] = {}
        if len(members) < 2 or len(set(groups.tolist())) < 2:
            return MemorizationReport(summary, {})
        rate = self.flag_rate if self.flag_rate is not None else context.flag_rate
        criterion = "NN-ratio < threshold (nearest / second-nearest member of another group)"
        if self.threshold is not None:
            threshold = given(criterion, self.threshold, inclusive=False, published=PUBLISHED)
        elif context.calibration is not None and len(context.calibration):
            calibration = grouped_ratio(context.calibration.unit(), members, groups, context.shard)[0]
            threshold = calibrate(criterion, calibration, rate, inclusive=False, published=PUBLISHED)
        else:
            raise ValueError("the NN-ratio threshold is calibrated on held-out images, and there are none: give data.num_heldout > 0")
        if context.heldout is not None and len(context.heldout):
            threshold.evaluate(grouped_ratio(context.heldout.unit(), members, groups, context.shard)[0])
        if context.num_samples:
            near = self.reduced(context)
            ratio, nearest, d1 = near["ratio"], near["nearest"], near["d1"]
            memorized = threshold.flags(ratio)
            matched = sorted({int(groups[i]) for i in nearest[memorized].tolist()})
            summary = MemorizationResult(
                threshold=threshold.value, ratio=ratio, nearest_index=nearest, nearest_l2=d1, memorized=memorized,
                matched_indices=matched, num_references=len(set(groups.tolist())),
            ).to_dict()
            summary["control"] = self._control(context, threshold, groups, near, memorized).to_dict()
        summary["thresholds"] = {"threshold": threshold.to_dict()}
        rates = {"memorization NN-ratio": threshold.heldout_rate} if threshold.heldout_rate is not None else {}
        return MemorizationReport(summary, rates)

    @staticmethod
    def _control(context: AuditContext, threshold: Threshold, groups: Tensor, near: dict[str, Tensor], memorized: Tensor) -> ChanceControl:
        """The member groups matched beside the held-out images matched with them in a member's place.

        A held-out image h in the members' place is matched by a sample x when it is x's nearest image and the ratio
        l2(x, h) / l2(x, nearest member) passes the same threshold (below 1, the second implies the first).
        """
        reps = len(set(groups.tolist()))
        nearest, d1 = near["nearest"], near["d1"]
        best = keep_closest({}, ((int(groups[i]), d) for i, d in zip(nearest[memorized].tolist(), d1[memorized].tolist())))
        heldout = context.heldout
        if heldout is None or not len(heldout):
            return ChanceControl.of_evidence("NN-ratio", best, reps, {}, 0)
        d_h, h = near["heldout_l2"], near["heldout"]
        passed = threshold.flags(_ratio(d_h, d1))
        chance = keep_closest({}, zip(h[passed].tolist(), d_h[passed].tolist()))
        return ChanceControl.of_evidence("NN-ratio", best, reps, chance, len(heldout))
