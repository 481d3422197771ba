"""The extraction attack of the audit: Carlini et al. 2023's two attacks against the members, beside their control.

Carlini, Hayes, Nasr et al., "Extracting Training Data from Diffusion Models" (USENIX Security
2023, arXiv:2301.13188). The attacks themselves are pure functions in :mod:`privdiff.eval.carlini`; the copy
criteria and the model's decodings are the audit's shared signals (:mod:`privdiff.eval.signals`). This plugin runs
both attacks in each space, counts what they extract by group of near-copies, and sets every count beside what the
same samples and thresholds flag with held-out images in the members' place (:mod:`privdiff.eval.controls`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from torch import Tensor

from privdiff.distances import Calibrated, calibrated_l2, nearest_neighbors, resolve_tile_size
from privdiff.shard import Shard

from .carlini import (
    ExtractionRecord,
    ExtractionResult,
    _calibrated_result,
    _closest_per_train,
    by_copies,
    clique_flags,
    match_flagged,
)
from .controls import ChanceControl, chance_text, keep_closest
from .plugin import AuditContext, AuditPlugin, Cases, Column, Privacy, SummaryResult
from .sample_stream import SampleReduction, concat
from .signals import CopyCriteria, copy_signals, copy_thresholds, floor_note, lower_bound, reconstruction_floor, space_images, spaces
from .thresholds import Threshold

__all__ = ["ExtractionAttack", "ExtractionReport"]

METHODS = ("generate_and_filter", "calibrated_l2")


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



@dataclass
class _SpaceRun:
    """One space's attacks: their results against the members, and per attack the evidence of each member flagged
    and of each held-out image flagged in the members' place (row -> its closest flagged sample's calibrated l2)."""

    results: list[ExtractionResult]
    evidence: dict[str, dict[int, float]]
    control: dict[str, dict[int, float]]


@dataclass
class _Kept:
    """What extraction keeps of the audit's samples: per space, every sample's calibrated l2 to the members
    (``score``, ``nearest_index``, ``nearest_l2``, ``scale``) and its nearest held-out image (``heldout``,
    ``heldout_l2``); and the candidates, the samples within reach of a copy (their images, labels and index among all
    samples)."""

    per_space: dict[str, dict[str, Tensor]]
    images: Tensor
    labels: Tensor | None
    index: Tensor
    num_samples: int

    def image(self, sample_index: int) -> Tensor:
        """A candidate's image by its index among all samples."""
        return self.images[int((self.index == sample_index).nonzero()[0, 0])]


@dataclass
class _Candidates(SampleReduction):
    """Extraction's reduction of each shard of samples (see :class:`_Kept`).

    A sample is kept as a candidate when, in some space, it lies within tau + delta (plain l2) of a member or a
    held-out image, or passes the calibrated test against either. Every sample a copy can be confirmed on passes this
    (its l2 to the image is at most delta, or its calibrated score is below the threshold), and so does every member
    of a clique it belongs to: a tiled l2 is never below the plain one, so a clique-mate within tau of a sample within
    delta of an image lies within tau + delta of that image. The cliques found among the candidates are therefore
    the cliques of the samples that can match an image, and ``num_samples_flagged`` counts those.
    """

    sets: dict[str, tuple[Tensor, Tensor | None]]  # space -> (members, held-out images) in that space
    bounds: dict[str, tuple[float, float]]  # space -> (tau + delta, calibrated threshold)
    n: int
    alpha: float
    shard: Shard | None

    def update(self, images: Tensor, labels: Tensor | None, first: int) -> dict[str, Tensor]:
        if not len(images):
            return {}
        keep = torch.zeros(len(images), dtype=torch.bool)
        out: dict[str, Tensor] = {}
        for space, (members, heldout) in self.sets.items():
            reach, cal_t = self.bounds[space]
            cal = calibrated_l2(images, members, n=self.n, alpha=self.alpha, shard=self.shard)
            out.update({f"{space}.score": cal.score, f"{space}.nearest_index": cal.nearest_index,
                        f"{space}.nearest_l2": cal.nearest_l2, f"{space}.scale": cal.scale})
            keep |= ((cal.nearest_l2 <= reach) | (cal.score < cal_t)).cpu()
            if heldout is not None:
                nb = nearest_neighbors(images, heldout, k=1, shard=self.shard)
                d = nb.distances[:, 0]
                out.update({f"{space}.heldout_l2": d, f"{space}.heldout": nb.indices[:, 0]})
                keep |= ((d <= reach) | (d < cal_t * cal.scale)).cpu()
        rows = keep.nonzero().squeeze(1)
        out.update(images=images[rows], index=rows + first)
        if labels is not None:
            out["labels"] = labels[rows]
        return out

    def merge(self, shards: list[dict[str, Tensor]]) -> _Kept:
        shards = [s for s in shards if s]
        if not shards:
            return _Kept({}, torch.empty(0), None, torch.empty(0, dtype=torch.long), 0)
        per_space = {space: {key.partition(".")[2]: concat(shards, key) for key in shards[0] if key.startswith(space + ".")}
                     for space in self.sets}
        labels = concat(shards, "labels") if "labels" in shards[0] else None
        count = len(next(iter(per_space.values()))["score"])
        return _Kept(per_space, concat(shards, "images"), labels, concat(shards, "index"), count)


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

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]  (the decodings only where it compares with them)
        return copy_signals(self.decoded)

    def criteria(self) -> CopyCriteria:
        """Its copy criteria as configured (the audit's shared signal computes their thresholds)."""
        return CopyCriteria(self.tau, self.delta, self.calibrated_threshold, self.flag_rate, self.tile_size,
                            self.calibrated_n, self.calibrated_alpha)

    def spaces(self, context: AuditContext) -> list[str]:
        """``["pixel"]``, and ``"decoded"`` where the model has a decoder and ``decoded`` is on."""
        return spaces(context, self.decoded)

    def thresholds(self, context: AuditContext, space: str = "pixel") -> dict[str, Threshold]:
        """tau, delta and the calibrated-l2 threshold of one space (:func:`privdiff.eval.signals.copy_thresholds`)."""
        return copy_thresholds(context, self.criteria(), space)

    def reduction(self, context: AuditContext) -> SampleReduction | None:
        sets, bounds = {}, {}
        for space in self.spaces(context):
            found = self.thresholds(context, space)
            sets[space] = (space_images(context, "members", space), space_images(context, "heldout", space))
            bounds[space] = (found["tau"].value + found["delta"].value, found["calibrated_threshold"].value)
        return _Candidates(sets, bounds, min(self.calibrated_n, len(context.members)), self.calibrated_alpha, context.shard)

    def _attack(self, context: AuditContext, space: str, found: Mapping[str, Threshold], kept: _Kept) -> _SpaceRun:
        """Both attacks in one space, and the held-out images each flags with the same samples and thresholds."""
        shard = context.shard
        members, heldout = space_images(context, "members", space), space_images(context, "heldout", space)
        tau, delta, cal_t = (found[k].value for k in ("tau", "delta", "calibrated_threshold"))
        flags = clique_flags(kept.images, kept.labels, tau, self.min_clique, self.tile_size, shard=shard)

        def matched(references: Tensor) -> list[ExtractionRecord]:  # candidate rows -> indices among all samples
            return [replace(r, sample_index=int(kept.index[r.sample_index]))
                    for r in match_flagged(kept.images, flags, references, delta, shard=shard)]

        gf = ExtractionResult("generate_and_filter", matched(members), int(flags.sum()), kept.num_samples, len(members),
                              {"tau": tau, "min_clique": self.min_clique, "delta": delta, "space": space,
                               "tile_size": resolve_tile_size(members.shape[-2], members.shape[-1], self.tile_size),
                               "candidates": len(kept.images)})
        v = kept.per_space[space]
        cal = Calibrated(score=v["score"], nearest_index=v["nearest_index"], nearest_l2=v["nearest_l2"],
                         n=min(self.calibrated_n, len(members)), alpha=float(self.calibrated_alpha), scale=v["scale"])
        cal_result = _calibrated_result(cal, cal_t, len(members), {"n": self.calibrated_n, "space": space})

        # Evidence for the rank test: a pair's l2 over the sample's scale (its calibrated l2), whichever attack flagged
        # it. Plain l2 would rank a patch of dark sky, close to every dark member by chance, above a real copy.
        def evidence(records: list[ExtractionRecord]) -> dict[int, float]:
            return keep_closest({}, ((r.train_index, r.distance / max(float(cal.scale[r.sample_index]), 1e-12)) for r in records))

        control: dict[str, dict[int, float]] = {m: {} for m in METHODS}
        if heldout is not None:
            control["generate_and_filter"] = evidence(matched(heldout))
            # The calibrated test against the members is l2 < threshold x the sample's scale (its neighbourhood among the
            # members); a held-out image passes in a member's place when it is the sample's nearest and within that radius.
            d_h, h = v["heldout_l2"], v["heldout"]
            passed = d_h < cal_t * cal.scale
            control["calibrated_l2"] = evidence(_closest_per_train(h[passed], passed.nonzero().squeeze(1), d_h[passed]))
        return _SpaceRun([gf, cal_result], {r.method: evidence(r.records) for r in (gf, cal_result)}, control)

    def run(self, context: AuditContext) -> ExtractionReport:
        ids = context.data.members.ids
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
        kept = self.reduced(context) if context.num_samples else None
        if kept is not None:
            for space in spaces:
                ran = self._attack(context, space, found[space], kept)
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
        grid = self._cases(kept, context.members, ids, labelled, context.data.group_copies(), context.data.members.captions)
        return ExtractionReport(summary, rates, grid)

    def _cases(self, kept: _Kept | None, members: Tensor, ids: list[str], labelled: list[tuple[ExtractionRecord, str]],
               copies: Tensor, captions: list[str] | None = None) -> Cases:
        """The closest extracted pair of each extracted member, closest first, at most ``max_cases``."""
        best: dict[int, tuple[ExtractionRecord, str]] = {}
        for r, method in labelled:
            if r.train_index not in best or r.distance < best[r.train_index][0].distance:
                best[r.train_index] = (r, method)
        chosen = sorted(best.values(), key=lambda rm: rm[0].distance)[: self.max_cases]
        shape = (0, *members.shape[1:])
        return Cases(
            samples=torch.stack([kept.image(r.sample_index) for r, _ in chosen]) if chosen else torch.empty(shape),
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
