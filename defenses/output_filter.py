"""A generation-side filter that refuses to emit samples that are near-copies of training images.

It gives NO differential-privacy guarantee and does NOT stop membership inference: the model
itself still memorizes; the filter only hides the closest copies from whoever samples through
privdiff. An attacker with the weights, or with images that pass just above the threshold, is not
stopped by it.
"""

from __future__ import annotations

import torch

from privdiff.distances import calibrated_l2
from .base import Defense, GenerationContext

DISCLAIMER = "no DP guarantee; does not stop membership inference"


class OutputFilterDefense(Defense):
    """Rejects samples whose calibrated l2 to the nearest training image is below ``threshold``.

    The calibrated l2 is Carlini et al. 2023's (§5.1): l2 to the nearest member divided by
    ``alpha`` times the mean l2 to the ``n`` nearest members. A score below 1 is their
    "extracted" criterion, so the default ``threshold=1.0`` refuses exactly what their white-box
    check would count as extracted; a larger threshold refuses more borderline copies.

    This is output filtering: it gives no DP guarantee (differential privacy) and does not stop
    membership inference (the weights are unchanged).

    Args:
        threshold: reject when the calibrated l2 is below this (> 0).
        n: neighbourhood of the calibration (50 in the paper).
        alpha: calibration factor (0.5 in the paper).
    """

    name = "output_filter"
    order = 30

    def __init__(self, threshold: float = 1.0, n: int = 50, alpha: float = 0.5) -> None:
        if not threshold > 0:
            raise ValueError(f"output_filter threshold must be > 0, got {threshold}")
        if n < 1 or not alpha > 0:
            raise ValueError(f"output_filter needs n >= 1 and alpha > 0, got n={n}, alpha={alpha}")
        self.threshold = float(threshold)
        self.n = int(n)
        self.alpha = float(alpha)
        self.checked = 0
        self.rejected = 0

    def keep_mask(self, images: torch.Tensor, context: GenerationContext) -> torch.Tensor:
        if context.reference is None or len(context.reference) == 0:
            raise ValueError(
                "output_filter needs the training images as GenerationContext.reference; sample through "
                "privdiff.eval.sampling.generate with the run's members"
            )
        score = calibrated_l2(images.flatten(1), context.reference.to(images.device), n=self.n, alpha=self.alpha).score
        keep = score >= self.threshold
        self.checked += len(keep)
        self.rejected += int((~keep).sum())
        return keep

    @property
    def reject_rate(self) -> float:
        return self.rejected / self.checked if self.checked else 0.0

    def metrics(self) -> dict[str, float | int | str]:
        return {
            "reject_rate": self.reject_rate,
            "rejected": self.rejected,
            "checked": self.checked,
            "threshold": self.threshold,
            "guarantee": DISCLAIMER,
        }

    def describe(self) -> str:
        return f"output_filter(cal-l2<{self.threshold:g})"
