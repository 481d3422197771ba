"""Memorization detection for text-to-image models without sampling to the end.

Two per-caption scores from the first denoising step(s) of a few seeds (defined and computed in
:mod:`privdiff.eval.caption_scores`): Wen et al.'s noise-difference magnitude (ICLR 2024) and Webster's
one-step consistency (2023); higher = more memorized. At t = T - 1 itself the one-step estimate divides by
sqrt(abar_T) (0.006 on the linear schedule) and amplifies every error of the noise prediction, so the
score is taken after the first steps instead (the AUCs per step and model are in docs/benchmarks.md).
Neither score wins everywhere: a tiny model maps a planted caption to a mixture of the planted images (the
consistency suffers), and where the planted rows are half of the data it generates them unconditionally
too (the magnitude suffers). The plugin reports both.

Both cost ``2 * seeds * first_steps`` noise-predictor calls per caption (conditional and
unconditional), against ``samples * steps`` for sampling a caption to the end, which is why the
prompt extraction attack (:mod:`privdiff.eval.prompt_extraction`) uses them as a screen.
The plugin :class:`MemorizationDetection` reports how well each score tells the captions of
duplicated training pairs from the others (ROC AUC) and how many member captions a threshold taken
from held-out captions flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privdiff.distances import nearest_two

from .caption_scores import SCORES, caption_scores, member_captions, natural_near_copies
from .mia_stats import auc
from .plugin import AuditContext, AuditPlugin, Column, Privacy, SummaryResult
from .signals import CopyCriteria, copy_thresholds
from .thresholds import calibrate

__all__ = ["DetectionReport", "MemorizationDetection"]


def _auc(positive: Tensor, negative: Tensor) -> float | None:
    """ROC AUC of telling ``positive`` scores from ``negative`` (``mia_stats.auc``); None when a side is empty."""
    if not len(positive) or not len(negative):
        return None
    scores = torch.cat([positive, negative]).double().numpy()
    return auc(scores, np.arange(len(scores)) < len(positive))


@dataclass
class DetectionReport(SummaryResult):
    def columns(self) -> list[Column]:
        s = self.summary
        wen, webster = (s[name]["auc_duplicated_vs_rest"] for name in SCORES)
        flagged = s["one_step"]["members_flagged"]
        text = "n/a" if webster is None else f"{webster:.3f} (Wen: {wen:.3f})"
        return [
            Column("detection_auc", "detection AUC", "ROC AUC of Webster's one-step consistency telling the captions of "
                   "duplicated training pairs from single members' and held-out captions (beside it Wen et al.'s "
                   "magnitude; n/a: no duplicated pair)", webster, text),
            Column("detected_captions", "captions detected", "member captions whose one-step consistency is above the "
                   "threshold taken from held-out captions (count of the member captions)", flagged,
                   f"{flagged}/{s['num_member_captions']}", Privacy.PRIVACY),
        ]

    def scalars(self) -> dict[str, float]:
        out = {}
        for name in SCORES:
            value = self.summary[name]["auc_duplicated_vs_rest"]
            if value is not None:
                out[f"detection_{name}_auc"] = float(value)
            out[f"detection_{name}_flagged"] = float(self.summary[name]["members_flagged"])
        return out

    def notes(self) -> list[str]:
        s = self.summary
        notes = [
            f"Detection: Webster 2023's one-step consistency (the same x0 estimate whatever the seed, taken after the first "
            f"{s['first_steps']} of {s['steps']} steps) and Wen et al. 2024's magnitude of the text-conditional minus "
            f"unconditional noise prediction over those steps, from {s['seeds']} seeds per caption ({s['calls_per_caption']} "
            f"noise-predictor calls per caption). Threshold: {s['one_step']['threshold']['description']}. Positives are the "
            "captions of duplicated training pairs, the ones Carlini et al. 2023 find memorized; a single-copy caption may be "
            "memorized too and then counts against the AUC.",
        ]
        if s.get("num_duplicated_captions") and s.get("training_rows"):
            text = (f"Both scores compare each caption with the empty prompt and assume what web-scale data has: the duplicated "
                    f"images are a small share of the training rows (here {s['duplicated_rows']} of {s['training_rows']}, "
                    f"{s['duplicated_rows'] / s['training_rows']:.0%}), so the model does not generate them unprompted")
            u = s.get("unconditional")
            if u and u["samples"]:
                text += (f". Of {u['samples']} samples for the empty prompt, {u['copy_duplicated']} "
                         f"({u['copy_duplicated'] / u['samples']:.0%}) copy a duplicated member (l2 <= delta = {u['delta']:.3g})")
                if u["copy_duplicated"]:
                    text += (": the unconditional prediction is drawn toward those images too, which shrinks their magnitude "
                             "(on the models measured, the more such copies, the lower Wen et al.'s AUC; under 0.5 can come "
                             "from that)")
            notes.append(text + ". Prompt extraction without the screen rests on neither premise.")
        return notes


class MemorizationDetection(AuditPlugin):
    """Wen et al.'s magnitude and Webster's one-step check on every member caption and the held-out captions.

    Args:
        seeds: start noises per caption.
        first_steps: steps of the trajectory the magnitude averages over (Wen et al. average the first steps; on the
            1000-step demo model the first step alone gave AUC 0.95, steps 1-10 0.99 at step 10).
        steps: the sampler's step count the timesteps are spaced for (and the unconditional samples' steps).
        max_heldout: held-out captions scored, of the calibration images (the threshold) and of the others (its
            false-flag rate) each.
        flag_rate: share of held-out calibration captions the thresholds may flag (None: the audit's).
        unconditional_samples: samples drawn for the empty prompt, through the audit's sampler, to check both scores'
            premise: that the model does not generate the duplicated images unprompted (0: not checked).
    """

    name = "detection"
    needs_samples = False

    def __init__(self, seeds: int = 4, first_steps: int = 10, steps: int = 50, max_heldout: int = 100,
                 flag_rate: float | None = None, unconditional_samples: int = 64) -> None:
        if seeds < 2 or first_steps < 1 or max_heldout < 1 or unconditional_samples < 0:
            raise ValueError(f"detection needs seeds >= 2, first_steps >= 1, max_heldout >= 1 and unconditional_samples >= 0, "
                             f"got {seeds}, {first_steps}, {max_heldout}, {unconditional_samples}")
        if first_steps >= steps:
            raise ValueError(f"detection scores the first {first_steps} of {steps} steps: give first_steps < steps")
        self.seeds, self.first_steps, self.steps, self.max_heldout, self.flag_rate = seeds, first_steps, steps, max_heldout, flag_rate
        self.unconditional_samples = unconditional_samples

    def run(self, context: AuditContext) -> DetectionReport | None:
        model = context.model
        if model.conditioning != "text" or context.calibration is None or context.calibration.captions is None:
            return None
        captions, copies, _ = member_captions(context)
        calibration = list(dict.fromkeys(context.calibration.captions))[: self.max_heldout]
        heldout = list(dict.fromkeys(context.heldout.captions))[: self.max_heldout] if context.heldout is not None and context.heldout.captions else []
        kw = {"seeds": self.seeds, "first_steps": self.first_steps, "steps": self.steps, "batch_size": context.batch_size}
        scored = caption_scores(model, captions + calibration + heldout, seed=context.seed, cache=context.caption_scores, **kw)
        n, c = len(captions), len(calibration)
        rate = self.flag_rate if self.flag_rate is not None else context.flag_rate
        duplicated = copies > 1
        rows = context.data.copies.long()
        duplicated_rows = int(rows[context.data.group_copies() > 1].sum())
        summary: dict[str, Any] = {"seeds": self.seeds, "first_steps": self.first_steps, "steps": self.steps, "num_member_captions": n,
                                   "num_duplicated_captions": int(duplicated.sum()), "num_heldout_captions": len(heldout),
                                   "training_rows": int(rows.sum()), "duplicated_rows": duplicated_rows,
                                   "natural_near_copies": natural_near_copies(context),
                                   "calls_per_caption": 2 * self.seeds * self.first_steps, "calls": scored.calls,
                                   "calls_spent": scored.calls_spent}
        rates = {}
        for name in SCORES:
            score = scored.of(name)
            members, cal, held = score[:n], score[n : n + c], score[n + c :]
            # A threshold on "higher = memorized": calibrate on the negated score (small = flagged).
            threshold = calibrate(f"{name} score above threshold", -cal, rate, inclusive=False)
            if len(held):
                threshold.evaluate(-held)
            flagged = threshold.flags(-members)
            rest = torch.cat([members[~duplicated], held])
            summary[name] = {
                "auc_duplicated_vs_rest": _auc(members[duplicated], rest),
                "auc_duplicated_vs_heldout": _auc(members[duplicated], held),
                "members_flagged": int(flagged.sum()), "duplicated_flagged": int(flagged[duplicated].sum()),
                "threshold": {**threshold.to_dict(), "value_on_score": -threshold.value},
                "member_scores": [{"caption": cap, "rows": int(k), "score": float(s)} for cap, k, s in zip(captions, copies, members)],
                "heldout_mean": float(held.mean()) if len(held) else None,
            }
            if threshold.heldout_rate is not None:
                rates[f"detection {name}"] = threshold.heldout_rate
        if self.unconditional_samples and context.sampler is not None and bool(duplicated.any()):
            summary["unconditional"] = self._unconditional(context)
        return DetectionReport(summary, rates)

    def _unconditional(self, context: AuditContext) -> dict[str, Any]:
        """How many samples for the empty prompt copy a duplicated member (l2 <= the extraction attack's delta).

        Both scores compare a caption with the empty prompt: where the model generates the duplicated images
        unprompted, a duplicated caption differs little from the empty one and both scores fall (docs/text_to_image.md).
        """
        # the audit's copy criterion (its extraction attack's delta, as configured); a context built by hand has none
        delta = (context.copy_thresholds("pixel") if context.copy_thresholds else copy_thresholds(context, CopyCriteria()))["delta"]
        # its own seed: not the audit's samples nor prompt extraction's (seed, seed + 1)
        drawn = context.sampler([""] * self.unconditional_samples, seed=context.seed + 3, steps=self.steps).images
        if not len(drawn):  # a generation-side filter rejected them all
            return {"samples": 0, "copy_duplicated": 0, "copy_any": 0, "delta": float(delta.value), "calls": 0}
        nearest, _, index = nearest_two(drawn, context.members, shard=context.shard)
        copies = delta.flags(nearest)
        duplicated = context.data.group_copies()[index] > 1
        return {"samples": len(drawn), "copy_duplicated": int((copies & duplicated).sum()), "copy_any": int(copies.sum()),
                "delta": float(delta.value), "calls": len(drawn) * self.steps}
