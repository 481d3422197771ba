"""Thresholds from the data: each distance criterion flags at most a stated share of real held-out images.

A criterion (l2 to the nearest member <= delta, calibrated l2 < 1, NN-ratio < 1/3, ...) calls a
generated sample a copy when its score against the members is small. Real images that no model
ever saw score against the members too, and how small depends on the data: at 16x16 digits the
published thresholds (Carlini et al. 2023, set for CIFAR-10 and 50k training images) flag about 40%
of held-out digits, and at 24x24 faces every held-out face lies within delta = 0.15 of a member
(design.md, "Published thresholds at low resolution"). So a threshold is taken from the data by default: the largest value at which
at most ``rate`` (1%) of a set of real held-out images set aside for that (the *calibration* images)
would be flagged, and its false-flag rate is then measured on *other* held-out images, with a
Clopper-Pearson interval. With fewer than 1/rate calibration images the asked rate cannot be
resolved: the threshold flags none of them (the strictest the data support) and the result says so.
The published value is always reported beside, with its own false-flag rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Threshold", "calibrate", "flag_rate", "heldout_needed", "rate_status"]

DEFAULT_RATE = 0.01


def _interval(flagged: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a share ``flagged / n``."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    ci = binomtest(flagged, n).proportion_ci(confidence_level=confidence, method="exact")
    return (float(ci.low), float(ci.high))


def heldout_needed(rate: float, confidence: float = 0.95) -> int:
    """Held-out images a criterion must flag none of for its exact interval to show a flag rate <= ``rate``.

    The upper end of the two-sided Clopper-Pearson interval of 0 of n is ``1 - ((1 - confidence) / 2) ** (1 / n)``;
    this is the smallest n that brings it to ``rate`` (368 for 1% at 95%).
    """
    if not 0 < rate < 1:
        raise ValueError(f"a flag rate must be in (0, 1), got {rate}")
    return math.ceil(math.log((1 - confidence) / 2) / math.log1p(-rate))


def rate_status(flagged: int, n: int, rate: float) -> str:
    """Whether ``flagged`` of ``n`` shows a flag rate of at most ``rate``: ``within`` (the exact 95% interval lies at or
    below it), ``above`` (its interval lies beyond it) or ``unresolved`` (the interval holds both)."""
    lo, hi = _interval(flagged, n)
    return "above" if lo > rate else "within" if hi <= rate else "unresolved"


def flag_rate(scores: Tensor, threshold: float, inclusive: bool) -> tuple[int, int]:
    """How many of ``scores`` a criterion flags (``score <= threshold`` if inclusive, else ``<``), of how many."""
    flagged = scores <= threshold if inclusive else scores < threshold
    return int(flagged.sum()), int(scores.numel())


@dataclass
class Threshold:
    """A criterion's threshold, how it was obtained, and how often it flags real held-out images.

    ``source`` is ``calibrated`` (from the calibration images at ``target_rate``) or ``given``
    (set in the config). ``heldout_rate`` (with its 95% interval) is measured on held-out images
    that were not used to calibrate; ``published`` and ``published_rate`` are the paper's value and
    its rate on the same images.
    """

    criterion: str
    value: float
    source: str
    inclusive: bool
    target_rate: float | None = None
    num_calibration: int = 0
    flagged_in_calibration: int = 0
    resolved: bool = True
    published: float | None = None
    heldout_rate: float | None = None
    heldout_interval: tuple[float, float] | None = None
    num_heldout: int = 0
    published_rate: float | None = None
    published_interval: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str | None:
        """Whether the measured false-flag rate shows the asked one: ``within`` (its interval lies at or below it),
        ``above`` (beyond its interval), ``unresolved`` (the interval holds both), None before :meth:`evaluate` or
        for a threshold set in the config (it asked no rate)."""
        if self.target_rate is None or self.heldout_rate is None or not self.num_heldout:
            return None
        return rate_status(round(self.heldout_rate * self.num_heldout), self.num_heldout, self.target_rate)

    def status_text(self) -> str:
        """The status in words, with the held-out images an unresolved one would need."""
        status = self.status
        if status == "unresolved":
            return (f"unresolved: {self.num_heldout} held-out images cannot show <= {self.target_rate:.1%} "
                    f"(needs {heldout_needed(self.target_rate)} flagging none)")
        if status == "above":
            return f"above the asked {self.target_rate:.1%}"
        return "within the asked rate" if status == "within" else "—"

    def flags(self, scores: Tensor) -> Tensor:
        return scores <= self.value if self.inclusive else scores < self.value

    def evaluate(self, heldout_scores: Tensor) -> "Threshold":
        """Measure the false-flag rate of this threshold (and of the published one) on held-out scores."""
        k, n = flag_rate(heldout_scores, self.value, self.inclusive)
        self.heldout_rate, self.heldout_interval, self.num_heldout = (k / n if n else None), _interval(k, n), n
        if self.published is not None:
            kp, _ = flag_rate(heldout_scores, self.published, self.inclusive)
            self.published_rate, self.published_interval = (kp / n if n else None), _interval(kp, n)
        if self.target_rate is not None and n and self.heldout_interval[0] > self.target_rate:
            self.notes.append(
                f"flags {k} of {n} held-out images ({k / n:.1%}), above the asked {self.target_rate:.1%} beyond its interval"
            )
        return self

    def how(self) -> str:
        """How the value was obtained."""
        if self.source == "given":
            return "set in the config"
        if self.resolved:
            return (f"calibrated to flag at most {self.target_rate:.1%} of {self.num_calibration} held-out calibration images "
                    f"({self.flagged_in_calibration} flagged)")
        return (f"the strictest the data support: {self.num_calibration} calibration images cannot resolve "
                f"{self.target_rate:.1%} (it needs {math.ceil(1 / self.target_rate)}), so it flags none of them and is "
                f"expected to flag about 1/{self.num_calibration + 1} = {1 / (self.num_calibration + 1):.1%} of other novel images")

    def describe(self) -> str:
        """The value, how it was obtained and its false-flag rates, in one sentence for the report."""
        text = f"{self.criterion}: {self.value:.4g} ({self.how()})"
        if self.heldout_rate is not None:
            lo, hi = self.heldout_interval
            text += f"; flags {self.heldout_rate:.1%} [{lo:.1%}, {hi:.1%}] of {self.num_heldout} other held-out images"
            if self.status in ("unresolved", "above"):
                text += f" ({self.status_text()})"
        if self.published is not None and self.published_rate is not None:
            text += f"; the published {self.published:g} would flag {self.published_rate:.1%}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "how": self.how(), "description": self.describe(), "status": self.status,
                "status_text": self.status_text()}


def calibrate(
    criterion: str,
    calibration_scores: Tensor,
    rate: float = DEFAULT_RATE,
    *,
    inclusive: bool,
    published: float | None = None,
) -> Threshold:
    """The largest threshold that flags at most ``floor(rate * n)`` of ``n`` calibration scores (small = flagged).

    ``inclusive``: the criterion flags ``score <= threshold`` (else ``score < threshold``). With
    ``floor(rate * n) == 0`` the threshold lies just below the smallest score: nothing is flagged,
    and ``resolved`` is False when n < 1/rate.
    """
    if not 0 < rate < 1:
        raise ValueError(f"a calibration rate must be in (0, 1), got {rate}")
    # In the scores' own precision: the attacks compare float32 distances with the threshold, and a
    # float64 value just below a float32 score would round back onto it.
    scores = calibration_scores.detach().flatten().float().sort().values
    n = int(scores.numel())
    if n == 0:
        raise ValueError(f"{criterion}: no held-out calibration image to calibrate the threshold on; give held-out images")
    allowed = math.floor(rate * n + 1e-9)
    cut = scores[allowed] if allowed < n else torch.tensor(math.inf)  # the first score that must not be flagged
    # inclusive flags <= t: t must be below the cut; exclusive flags < t: t may equal it.
    value = float(torch.nextafter(cut, torch.tensor(-math.inf)) if inclusive else cut)
    flagged, _ = flag_rate(scores, value, inclusive)
    return Threshold(
        criterion=criterion, value=value, source="calibrated", inclusive=inclusive, target_rate=rate, num_calibration=n,
        flagged_in_calibration=flagged, resolved=n * rate >= 1, published=published,
    )


def given(criterion: str, value: float, *, inclusive: bool, published: float | None = None) -> Threshold:
    """A threshold set in the config (its false-flag rate is still measured)."""
    return Threshold(criterion=criterion, value=float(value), source="given", inclusive=inclusive, published=published)


def split_heldout(num: int, seed: int, calibration_share: float = 0.5) -> tuple[Tensor, Tensor]:
    """Seeded rows of ``num`` held-out images: (calibration, evaluation), the first ``calibration_share``."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    cut = int(round(num * calibration_share))
    return order[:cut].sort().values, order[cut:].sort().values
