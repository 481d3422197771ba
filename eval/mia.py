"""The membership-inference audit: the attacks of :mod:`privdiff.eval.mia_attacks` on members and as many held-out
images, with figures that are honest about selection and sample size (:mod:`privdiff.eval.mia_stats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from . import mia_stats
from .mia_attacks import loss_scores, pia_scores, secmi_scores
from .plugin import AuditContext, AuditPlugin, AuditResult, Column, Privacy, setting_panels, table_condition

__all__ = ["MIA_ATTACKS", "MembershipInference", "MembershipReport", "check_mia_sizes"]


MIA_ATTACKS = ("loss", "pia", "secmi")
NO_NOISE_PREDICTOR = "loss, PIA and SecMI query a noise predictor, and this model has none (a GAN: see the gan_mia attack)"


def check_mia_sizes(num_members: int, num_heldout: int, examples: int | None) -> int:
    """Return how many members (and as many held-out images) membership inference scores.

    Raises ``ValueError`` naming the setting to change when fewer than 2 of either are available.
    """
    n = min(num_members, num_heldout)
    if examples is not None:
        n = min(n, examples)
    if n < 2:
        if num_heldout < 2:
            why = f"at least 2 held-out images, got data.num_heldout={num_heldout}; raise data.num_heldout"
        elif num_members < 2:
            why = f"at least 2 members, got {num_members}; raise data.num_members"
        else:
            why = f"at least 2 examples, got audit.attacks.mia.examples={examples}; raise it"
        raise ValueError(f"membership inference needs {why} (or leave mia out of audit.attacks)")
    return n


@dataclass
class MembershipReport(AuditResult):
    """Each attack's cross-fitted ROC figures with bootstrap intervals, the strongest one, and the ROC points."""

    summary: dict

    def to_dict(self) -> dict:
        return self.summary

    def columns(self) -> list[Column]:
        if "not_applicable" in self.summary:
            return [Column("mia", "best MIA AUC", "ROC AUC of the strongest attack (n/a: the model has no noise predictor)",
                           None, "n/a", Privacy.PRIVACY)]
        best = self.summary.get("best")
        if not best:
            return []
        lo, hi = best["auc_interval"]
        tlo, thi = best["tpr_interval"]
        return [
            Column("mia", "best MIA AUC", "ROC AUC of the strongest attack, members vs held-out, chosen on one half of the "
                   "pairs and measured on the other (cross-fitted), with its 95% bootstrap interval", best["auc"],
                   f"{best['auc']:.3f} [{lo:.2f}, {hi:.2f}] ({best['attack']})", Privacy.PRIVACY),
            Column("tpr", "TPR@low FPR", "true-positive rate of that attack at the lowest false-positive rate the held-out "
                   "count resolves (max(1%, 1/n)), with its 95% interval", best["tpr"],
                   f"{best['tpr']:.3g} [{tlo:.2f}, {thi:.2f}] @{best['fpr']:.1%}"),
        ]

    def verdict(self) -> str | None:
        best = self.summary.get("best")
        if not best:
            return None
        lo, hi = best["auc_interval"]
        return f"membership inference: AUC {best['auc']:.2f} [{lo:.2f}, {hi:.2f}] ({best['attack']}), {best['verdict']}"

    def scalars(self) -> dict[str, float]:
        out = {}
        for attack in MIA_ATTACKS:
            if attack in self.summary:
                out[f"mia_{attack}_auc"] = float(self.summary[attack]["auc"])
                out[f"mia_{attack}_tpr_at_low_fpr"] = float(self.summary[attack]["tpr"])
        return out

    def notes(self) -> list[str]:
        if "not_applicable" in self.summary:
            return [f"MIA: n/a: {self.summary['not_applicable']}"]
        notes = ["MIA: each attack's timestep (and the strongest attack) is chosen on one half of the member/held-out "
                 "pairs and its AUC measured on the other half, both ways, and averaged; [intervals] are 95% bootstrap "
                 "intervals. With n held-out images no FPR below 1/n is resolved: the TPR says at which FPR it is taken."]
        for attack in MIA_ATTACKS:
            verdict = (self.summary.get(attack) or {}).get("verdict")
            if verdict == "below chance":
                notes.append(
                    f"MIA {attack}: AUC below chance beyond its interval: members score as *less* member-like than held-out "
                    "images, i.e. the attack's assumption is inverted for this model (SecMI's round-trip error grows on the "
                    "images a model has memorized hardest). Its AUC is reported, not read as privacy."
                )
        return notes


def _verdict(interval: list[float]) -> str:
    lo, hi = interval
    if hi < 0.5:
        return "below chance"
    if lo <= 0.5 <= hi:
        return "chance"
    return "above chance"


class MembershipInference(AuditPlugin):
    """Loss-threshold, PIA and SecMI membership inference against members and as many held-out images.

    Figures are honest about selection and sample size (``privdiff.eval.mia_stats``): the loss
    attack's timestep and the strongest attack are chosen on one half of the pairs and measured on
    the other; AUC and TPR come with 95% bootstrap intervals; TPR is taken at the lowest FPR the
    held-out count resolves.

    Args:
        attacks: which of ``loss``, ``pia``, ``secmi`` run.
        examples: members (and as many held-out images) scored; None: as many as both sets allow.
        loss_timesteps: timesteps the loss attack chooses among.
        pia_t: PIA's timestep (Kong et al.: 200).
        secmi_t, secmi_k: SecMI's timestep and DDIM interval (Duan et al.: 100, 10).
        resamples: bootstrap resamples of the intervals.
    """

    name = "mia"
    needs_samples = False

    def __init__(
        self,
        attacks: list[str] = list(MIA_ATTACKS),
        examples: int | None = None,
        loss_timesteps: list[int] = [10, 50, 100, 200, 300, 500],
        pia_t: int = 200,
        secmi_t: int = 100,
        secmi_k: int = 10,
        resamples: int = 300,
    ) -> None:
        unknown = set(attacks) - set(MIA_ATTACKS)
        if unknown or not attacks:
            raise ValueError(f"membership inference attacks must be a non-empty subset of {MIA_ATTACKS}, got {attacks}")
        self.attacks, self.examples = list(attacks), examples
        self.loss_timesteps, self.pia_t, self.secmi_t, self.secmi_k = list(loss_timesteps), pia_t, secmi_t, secmi_k
        self.resamples = resamples

    def check(self, num_members: int, num_heldout: int) -> None:
        check_mia_sizes(num_members, num_heldout, self.examples)

    def run(self, context: AuditContext) -> MembershipReport:
        data, model = context.data, context.model
        if not model.has_noise_predictor:
            return MembershipReport({"not_applicable": NO_NOISE_PREDICTOR})
        heldout = context.heldout if context.heldout is not None else data.heldout
        n = check_mia_sizes(len(data.members), len(heldout), self.examples)
        both = type(data.members).concat([data.members.select(range(n)), heldout.select(range(n))])
        with torch.no_grad():
            x = model.encode(both.unit().to(model.device))
        y = table_condition(both, model)
        kw = {"batch_size": context.batch_size, "progress": context.progress}
        stats = {"seed": context.seed, "resamples": self.resamples}
        out: dict = {"num_members": n, "num_nonmembers": n}
        candidates: dict[str, np.ndarray] = {}
        if "loss" in self.attacks:
            matrix = loss_scores(model, x, y, self.loss_timesteps, seed=context.seed, **kw).double().numpy()
            by_t = {f"loss@t{t}": matrix[:, j] for j, t in enumerate(self.loss_timesteps)}
            candidates.update(by_t)
            fitted = mia_stats.crossfit(by_t, n, **stats)
            member = np.arange(2 * n) < n
            out["loss"] = {**fitted, "per_timestep_auc": {str(t): mia_stats.auc(matrix[:, j], member) for j, t in enumerate(self.loss_timesteps)},
                           "roc": mia_stats.roc_points(by_t[fitted["chosen"][0]], member)}
        if "pia" in self.attacks:
            candidates["pia"] = pia_scores(model, x, y, t=self.pia_t, **kw).double().numpy()
            out["pia"] = {**mia_stats.single(candidates["pia"], n, **stats), "t": self.pia_t}
        if "secmi" in self.attacks:
            candidates["secmi"] = secmi_scores(model, x, y, t_sec=self.secmi_t, k=self.secmi_k, **kw).double().numpy()
            out["secmi"] = {**mia_stats.single(candidates["secmi"], n, **stats), "t_sec": self.secmi_t, "k": self.secmi_k}
        for attack in MIA_ATTACKS:
            if attack in out:
                out[attack]["verdict"] = _verdict(out[attack]["auc_interval"])
        best = mia_stats.crossfit(candidates, n, **stats)
        chosen = sorted({c.split("@")[0] for c in best["chosen"]})
        out["best"] = {**best, "attack": "/".join(chosen), "verdict": _verdict(best["auc_interval"])}
        return MembershipReport(out)

    @classmethod
    def figures(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any]]:
        """ROC curves (log-scaled FPR, where low-FPR leakage shows) of each attack, one panel per setting."""
        drawn = setting_panels(runs, cls.name, 3.3)
        if drawn is None:
            return []
        fig, panels = drawn
        for ax, name, mia in panels:
            n = mia["num_nonmembers"]
            for attack in MIA_ATTACKS:
                if attack in mia and "roc" in mia[attack]:
                    roc = mia[attack]["roc"]
                    ax.plot(np.maximum(roc["fpr"], 1 / n), roc["tpr"], label=f"{attack} {mia[attack]['auc']:.2f}")
            ax.plot([1 / n, 1], [1 / n, 1], ls=":", color="grey")
            ax.set_xscale("log")
            ax.set_xlim(1 / n, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(f"FPR (log; n={n} held-out)")
            ax.set_ylabel("TPR")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        return [("membership inference ROC", fig)]
