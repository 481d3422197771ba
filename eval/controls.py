"""Control groups: every count of member images beside what the same procedure gives on held-out images.

A distance criterion that flags a share r of novel real images flags about r x N of N generated samples
that copy nothing, and with many samples some of them land near some member by chance: a minimum over
thousands of draws lies far lower than one over the few held-out images a threshold was calibrated on.
So a count of "extracted" members is evidence only beside its control: the same samples, the same
thresholds and the same grouping, with held-out images (never trained on, and not the ones that set
the thresholds) in the members' place. Members and held-out images are a seeded random split of one
pool, so under "the model copies nothing" each is flagged with the same probability; the control's
share, scaled to the number of member images, is what chance alone gives, and a one-sided Fisher exact
test says whether the members were flagged more often than that.

A count test is weak where members are few: 3 exact copies among 64 members do not make 3/64 differ
from 2/200 chance flags. A copy is also *closer* than any chance flag, so the second test ranks the
evidence (each image's closest flagged sample, by its calibrated l2: the l2 over the sample's typical
distance to the members, so that a patch of dark sky, near every dark image, does not outrank a copy): under the same exchangeability the k most extreme of
the G members and H held-out images are all members with probability C(G, k) / C(G + H, k). The
verdict takes the smaller p-value of the two, doubled (Bonferroni).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .thresholds import _interval

__all__ = ["CONTROL_FIELDS", "ChanceControl", "chance_text", "keep_closest"]

SIGNIFICANCE = 0.05
CONTROL_FIELDS = ("criterion", "flagged", "num_members", "control_flagged", "num_control", "beyond_control")


def keep_closest(into: dict[int, float], found: Iterable[tuple[int, float]]) -> dict[int, float]:
    """Merge ``(key, evidence)`` pairs into ``into``, keeping each key's smallest (strongest) evidence; returns ``into``."""
    for key, value in found:
        if value < into.get(key, math.inf):
            into[key] = value
    return into


def chance_text(control: Mapping[str, Any] | None) -> str:
    """`` · chance 0.8 [0.0, 4.4] · above (p 0.001)``: what a table cell adds to a count from its control's dict."""
    return f" · {control['text']}" if control else ""


@dataclass
class ChanceControl:
    """A criterion's member count beside its control count.

    Attributes:
        criterion: what was counted (``union``, ``generate_and_filter``, ...).
        flagged: member images (groups of near-copies) the criterion flagged.
        num_members: member images it could flag.
        control_flagged: held-out images the same procedure flagged with them in the members' place.
        num_control: held-out images in the control.
        beyond_control: flagged member images whose evidence (the closest flagged sample, by calibrated l2) is
            stronger than every held-out image's (None: not measured).
    """

    criterion: str
    flagged: int
    num_members: int
    control_flagged: int
    num_control: int
    beyond_control: int | None = None

    @classmethod
    def of_evidence(cls, criterion: str, members: Mapping[int, float], num_members: int, control: Mapping[int, float],
                    num_control: int) -> "ChanceControl":
        """From the flagged member images and held-out images, each with its evidence (smaller = stronger): the counts,
        and how many members are stronger than every held-out image (None without a control)."""
        closest_chance = min(control.values(), default=math.inf)
        beyond = sum(1 for v in members.values() if v < closest_chance) if num_control else None
        return cls(criterion, len(members), num_members, len(control), num_control, beyond)

    @property
    def expected(self) -> float | None:
        """Member images chance alone flags: the control's share times the number of members (None: no control)."""
        return self.control_flagged / self.num_control * self.num_members if self.num_control else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% exact (Clopper-Pearson) interval of that chance count."""
        if not self.num_control:
            return None
        lo, hi = _interval(self.control_flagged, self.num_control)
        return (lo * self.num_members, hi * self.num_members)

    @property
    def p_value(self) -> float | None:
        """One-sided Fisher exact test that members are flagged more often than held-out images (None: no control)."""
        if not self.num_control or not self.num_members:
            return None
        from scipy.stats import fisher_exact

        table = [[self.flagged, self.num_members - self.flagged], [self.control_flagged, self.num_control - self.control_flagged]]
        return float(fisher_exact(table, alternative="greater").pvalue)

    @property
    def rank_p_value(self) -> float | None:
        """Chance that the ``beyond_control`` most extreme of the members and held-out images are all members."""
        if not self.num_control or self.beyond_control is None:
            return None
        g, h, p = self.num_members, self.num_control, 1.0
        for i in range(self.beyond_control):
            p *= (g - i) / (g + h - i)
        return p

    @property
    def combined_p_value(self) -> float | None:
        """The smaller of the count test's and the rank test's p-values, doubled (Bonferroni), at most 1."""
        ps = [p for p in (self.p_value, self.rank_p_value) if p is not None]
        return min(1.0, 2 * min(ps)) if len(ps) == 2 else (ps[0] if ps else None)

    @property
    def above_chance(self) -> bool | None:
        """Whether the members were flagged beyond chance at the 5% level (None: no control to tell)."""
        p = self.combined_p_value
        return None if p is None else p < SIGNIFICANCE

    @property
    def excess(self) -> float | None:
        """Member images flagged beyond the chance count (an estimate, never below 0)."""
        return None if self.expected is None else max(0.0, self.flagged - self.expected)

    def verdict(self) -> str:
        """``above chance``, ``within chance`` or ``no control`` (no held-out images to compare with)."""
        above = self.above_chance
        return "no control" if above is None else "above chance" if above else "within chance"

    def text(self) -> str:
        """``chance 0.8 [0.0, 4.4] · above (p 0.001)``: the control and the tests, for a table cell beside the count
        (how many members are closer than any held-out image is in :meth:`sentence`)."""
        if self.expected is None:
            return "no control"
        lo, hi = self.interval
        return f"chance {self.expected:.1f} [{lo:.1f}, {hi:.1f}] · {'above' if self.above_chance else 'not above'} (p {self.combined_p_value:.2g})"

    def verdict_text(self) -> str:
        """``above chance (p 0.001)``: the verdict alone, for a narrow table cell."""
        if self.expected is None:
            return "no control"
        return f"{'above' if self.above_chance else 'not above'} chance (p {self.combined_p_value:.2g})"

    def sentence(self, what: str = "member images") -> str:
        """The comparison in one sentence for the report's notes."""
        if self.expected is None:
            return f"{self.flagged} {what} flagged; there are no held-out images to tell how many chance would give."
        lo, hi = self.interval
        text = (f"{self.flagged} of {self.num_members} {what} flagged; the same procedure with {self.num_control} held-out "
                f"images in their place flagged {self.control_flagged}, so chance alone gives about {self.expected:.1f} "
                f"[{lo:.1f}, {hi:.1f}] of {self.num_members}: ")
        if self.beyond_control is not None:
            text += (f"{self.beyond_control} of the members are closer to a flagged sample than any held-out image "
                     f"(rank test p = {self.rank_p_value:.2g}; count test, one-sided Fisher exact, p = {self.p_value:.2g}): ")
        else:
            text += f"count test (one-sided Fisher exact) p = {self.p_value:.2g}: "
        if self.above_chance:
            return text + f"beyond chance (p = {self.combined_p_value:.2g} for both tests together)."
        return text + (f"not beyond chance (p = {self.combined_p_value:.2g}); do not read the count as extraction"
                       + (f" (more held-out images would narrow the interval: {self.num_control} now)." if hi - lo > 1 else "."))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChanceControl":
        """Back from :meth:`to_dict` (the report reads ``audit.json``)."""
        return cls(**{k: d.get(k) for k in CONTROL_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        interval = list(self.interval) if self.interval is not None else None  # JSON has no tuples: equal after a round trip
        return {**asdict(self), "expected": self.expected, "interval": interval, "p_value": self.p_value,
                "rank_p_value": self.rank_p_value, "combined_p_value": self.combined_p_value, "above_chance": self.above_chance, "excess": self.excess, "verdict": self.verdict(), "text": self.text(),
                "verdict_text": self.verdict_text()}
