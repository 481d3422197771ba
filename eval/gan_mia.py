"""LOGAN's white-box membership attack on a GAN: the discriminator's score of members against held-out images.

Hayes et al., "LOGAN: Membership Inference Attacks Against Generative Models" (PoPETs 2019), sec. 4.1: a
discriminator that over-fits scores its training images as more "real" than images it never saw, so D(x) ranks
members first. The AUC and the TPR at low FPR come with the bootstrap intervals of :mod:`privdiff.eval.mia_stats`
(the membership-inference plugin's), on members and as many evaluation held-out images. A model without a
discriminator (a diffusion model) gets "n/a".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import mia_stats
from .plugin import AuditContext, AuditPlugin, AuditResult, Column, Privacy

__all__ = ["DiscriminatorMIA", "GanMembershipReport", "discriminator_scores"]


def discriminator_scores(score: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N,) ``score(batch)`` (the discriminator's logit, higher = more member-like) of images in [0, 1], batched."""
    with torch.no_grad():
        return torch.cat([score(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])


def _verdict(interval: list[float]) -> str:
    lo, hi = interval
    return "below chance" if hi < 0.5 else "chance" if lo <= 0.5 <= hi else "above chance"


@dataclass
class GanMembershipReport(AuditResult):
    """LOGAN's AUC and TPR at low FPR with intervals, or why the attack does not apply."""

    summary: dict

    def to_dict(self) -> dict:
        return self.summary

    def columns(self) -> list[Column]:
        header = "LOGAN AUC"
        unit = ("ROC AUC of the discriminator's score (LOGAN, Hayes et al. 2019), members vs held-out, with its 95% "
                "bootstrap interval")
        if "not_applicable" in self.summary:
            return [Column("gan_mia", header, unit, None, "n/a", Privacy.PRIVACY)]
        lo, hi = self.summary["auc_interval"]
        return [Column("gan_mia", header, unit, self.summary["auc"], f"{self.summary['auc']:.3f} [{lo:.2f}, {hi:.2f}]",
                       Privacy.PRIVACY)]

    def scalars(self) -> dict[str, float]:
        if "auc" not in self.summary:
            return {}
        return {"gan_mia_auc": float(self.summary["auc"]), "gan_mia_tpr_at_low_fpr": float(self.summary["tpr"])}

    def notes(self) -> list[str]:
        if "not_applicable" in self.summary:
            return [f"LOGAN: n/a: {self.summary['not_applicable']}"]
        return ["LOGAN scores each image by the discriminator the GAN was trained with (white-box): the released "
                "generator alone does not expose it, so this is the leakage of releasing the discriminator too."]

    def verdict(self) -> str | None:
        if "auc" not in self.summary:
            return None
        lo, hi = self.summary["auc_interval"]
        return f"LOGAN: AUC {self.summary['auc']:.2f} [{lo:.2f}, {hi:.2f}], {self.summary['verdict']}"


class DiscriminatorMIA(AuditPlugin):
    """LOGAN's white-box attack: the GAN discriminator's logit as the membership score (Hayes et al. 2019, sec. 4.1).

    Args:
        examples: members (and as many held-out images) scored; None: as many as both sets allow.
        resamples: bootstrap resamples of the intervals.
    """

    name = "gan_mia"
    needs_samples = False

    def __init__(self, examples: int | None = None, resamples: int = 300) -> None:
        if examples is not None and examples < 2:
            raise ValueError(f"gan_mia examples must be >= 2 (or null), got {examples}")
        self.examples, self.resamples = examples, resamples

    def run(self, context: AuditContext) -> GanMembershipReport:
        model = context.model
        if not model.has_discriminator:
            return GanMembershipReport({"not_applicable": "the model has no discriminator (LOGAN attacks GANs)"})
        heldout = context.heldout if context.heldout is not None else context.data.heldout
        n = min(len(context.data.members), len(heldout), self.examples or len(heldout))
        if n < 2:
            return GanMembershipReport({"not_applicable": f"needs at least 2 members and 2 held-out images, got {n}"})
        images = torch.cat([context.members[:n], heldout.select(range(n)).unit()])
        scores = discriminator_scores(model.discriminator_score, images, context.batch_size).double().numpy()
        found = mia_stats.single(scores, n, seed=context.seed, resamples=self.resamples)
        return GanMembershipReport({**found, "num_members": n, "num_nonmembers": n, "verdict": _verdict(found["auc_interval"])})
