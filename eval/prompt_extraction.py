"""Prompt-based extraction from a text-to-image model (Carlini et al. 2023, Sec. 4 on Stable Diffusion).

For the training captions, the most duplicated first, generate many samples per caption with
different seeds (through the audit's sampler, so generation-side defenses act), flag a caption whose
generations hold a dense clique under tiled l2 (the same cliques as
:func:`privdiff.eval.carlini.generate_and_filter`), then confirm the copy against the training
image(s) of that caption with plain l2, where that image is also the sample's nearest among the
members and held-out images (a sample nearer another image copies that one). The thresholds (tau,
delta) are the extraction attack's, taken from held-out images. Held-out captions are searched the
same way, against their own (never trained) image: a flag there is a false one.

With ``screen: magnitude`` (or ``one_step``) only the captions whose detection score
(:mod:`privdiff.eval.detection`) is above a threshold taken from held-out captions are sampled;
``verify_screen: true`` also searches every caption, to show what the screen saves (noise-predictor
calls) and whether it finds the same set. The screened search is then the full search's samples of
the captions the screen passed, not new ones: the same draws, so what the screen misses is what it
dropped and not the luck of other draws; its cost is still counted as a screened search alone's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from privdiff.distances import pairwise_l2

from .controls import ChanceControl, chance_text
from .caption_scores import caption_scores, member_captions, natural_near_copies
from .carlini import generate_and_filter
from .plugin import AuditContext, AuditPlugin, Cases, Column, Privacy, SummaryResult
from .signals import CopyCriteria, copy_signals, copy_thresholds, floor_note, lower_bound, reconstruction_floor, space_images
from .signals import spaces as copy_spaces
from .thresholds import calibrate

__all__ = ["PromptExtraction", "PromptExtractionReport"]

SCREENS = ("none", "magnitude", "one_step")


@dataclass
class _Search:
    """What sampling one list of captions found."""

    flagged: list[bool]  # a clique among the caption's samples
    confirmed: list[dict[str, Any] | None]  # the clique copies the caption's own image: {member, distance, sample}
    copies_member: list[bool]  # the clique copies some member (any caption's)
    by_space: list[dict[str, float]]  # per caption, per space: the closest attributed clique sample to its image within delta
    samples: Tensor
    labels: Tensor
    calls: int

    def restricted(self, keep: list[int]) -> "_Search":
        """The search of the captions ``keep`` (indices into this one's) on the same samples.

        ``samples`` stay whole, so every confirmed copy's ``sample`` index still points at its image;
        the calls are this search's per caption (redraws of a generation-side filter included) times the kept captions.
        """
        calls = round(self.calls * len(keep) / len(self.flagged)) if self.flagged else 0
        return _Search([self.flagged[i] for i in keep], [self.confirmed[i] for i in keep], [self.copies_member[i] for i in keep],
                       [self.by_space[i] for i in keep], self.samples, self.labels, calls)


@dataclass
class PromptExtractionReport(SummaryResult):
    """The search's summary (extracted captions, recall on planted pairs, held-out flags, the screen) and its cases."""

    def columns(self) -> list[Column]:
        s = self.summary
        screen = s.get("screen") or {}
        verified = "unscreened_extracted" in screen  # verify_screen: the full search ran too
        extracted = f"{s['extracted']}/{s['searched_member_captions']}"
        if verified:
            extracted += f" ({screen['unscreened_extracted']} unscreened)"
        extracted += chance_text(s.get("control")) + lower_bound(s.get("reconstruction_floor"))  # the control: unscreened, where it ran
        cols = [Column("extracted_captions", "captions extracted · chance", "member captions whose generations form a clique "
                       "that copies the caption's training image (of the captions searched; in brackets, every caption "
                       "sampled without the screen), beside what the held-out captions searched the same way give, scaled "
                       "to the member captions (compared with the unscreened count where it ran: held-out captions are "
                       "never screened)", s["extracted"], extracted, Privacy.PRIVACY)]
        if s.get("planted_recall") is not None:
            recalled = f"{s['planted_found']}/{s['planted']}"
            if verified:
                recalled += f" ({screen['unscreened_planted_found']} unscreened)"
            recalled += lower_bound(s.get("reconstruction_floor"))
            cols.append(Column("planted_recall", "duplicated pairs recalled", "share of the captions of duplicated "
                               "image-caption pairs that prompt extraction recovers (in brackets: without the screen)",
                               s["planted_recall"], recalled, Privacy.PRIVACY))
        return cols

    def scalars(self) -> dict[str, float]:
        s = self.summary
        out = {"prompt_extracted": float(s["extracted"]), "prompt_heldout_flagged": float(s["heldout_flagged"])}
        if s.get("planted_recall") is not None:
            out["prompt_planted_recall"] = float(s["planted_recall"])
        screen = s.get("screen") or {}
        if "unscreened_extracted" in screen:
            out["prompt_unscreened_extracted"] = float(screen["unscreened_extracted"])
        return out

    def notes(self) -> list[str]:
        s = self.summary
        notes = [
            f"Prompt extraction (Carlini et al. 2023 Sec. 4): {s['samples_per_caption']} samples per caption, the most duplicated "
            f"captions first; a caption is extracted when its samples hold a clique of {s['min_clique']} under tiled l2 <= "
            f"tau = {s['tau']:.3g} and the clique lies within l2 delta = {s['delta']:.3g} of the caption's training image, nearer "
            "to it than to any other member or held-out image. "
            f"{s['searched_heldout_captions']} held-out captions searched the same way against their own image: "
            f"{s['heldout_flagged']} flagged; {s['heldout_copies_member']} of them return a near-copy of some member instead."
        ]
        cal = s.get("caption_deltas")
        if cal:
            lowered = "; ".join(f"{space}: {cal[space]['image_delta']:.3g} from held-out images, {cal[space]['delta']:.3g} used "
                                f"({cal[space]['matched']} matched their own image)" for space in s.get("spaces", ["pixel"]) if space in cal)
            notes.append(f"Delta checked on {cal['captions']} held-out calibration captions searched the same way (none of the "
                         f"control's): {lowered}.")
        if s.get("control"):
            notes.append("Control (prompt extraction, by caption): " + ChanceControl.from_dict(s["control"]).sentence("member captions"))
        if s.get("natural_near_copies"):
            notes.append(f"{s['natural_near_copies']} groups of near-copies among the members carry different captions (e.g. two "
                         "photos of one person): natural near-copies, not duplicated image-caption pairs, so they are not "
                         "counted among the duplicated pairs.")
        floor = floor_note(s.get("reconstruction_floor"))
        if floor:
            notes.append(floor)
        screen = s.get("screen")
        if screen and screen["kind"] != "none":
            text = (f"Screen ({screen['kind']} score above the threshold that passes at most {screen['rate']:.0%} of held-out "
                    f"calibration captions): {screen['passed']} of {screen['candidates']} captions sampled, "
                    f"{screen['calls']} noise-predictor calls in all (the screen's scores counted in full")
            shared = screen["screen_calls"] - screen.get("screen_calls_spent", screen["screen_calls"])
            text += f", {shared} of them shared with the detection plugin)" if shared else ")"
            if screen.get("unscreened_calls"):
                text += (f", against {screen['unscreened_calls']} without the screen ({screen['saving']:.1f}x fewer); "
                         f"the unscreened search extracted {screen['unscreened_extracted']} captions"
                         + (" (the same set)." if screen["same_set"] else f", the screen missed {screen['missed']}."))
            notes.append(text)
        return notes


class PromptExtraction(AuditPlugin):
    """Carlini et al.'s prompt extraction from a text-to-image model, optionally behind a detection screen.

    Args:
        samples_per_caption: generations per caption, each from its own seed (Carlini et al.: 500).
        min_clique: clique of near-identical generations that flags a caption (Carlini et al.: 10 of 500). 3 of 16 by
            default: on tiny models over-trained on planted pairs a planted caption returned its own image in 3-8 of 16
            samples (the rest: other planted images), so a clique of 5 missed up to half of them; the
            match to the caption's own training image within delta, not the clique, is what keeps false flags down.
        max_captions: member captions searched, the most duplicated first (None: all).
        heldout_captions: held-out captions searched the same way (false flags).
        steps: sampler steps (None: the audit's).
        tau, delta: the clique edge and the match to a training image (None: taken from held-out images,
            as the extraction attack does).
        screen: ``none``, ``magnitude`` (Wen et al. 2024) or ``one_step`` (Webster 2023's consistency of the
            x0 estimate over seeds, the default): sample only the captions whose score passes a threshold set on
            held-out calibration captions. Neither score separated the planted captions on every model measured
            (see :mod:`privdiff.eval.detection`); on the demo's model the one-step screen missed all 4 planted
            pairs, which is why a screened search should be checked with ``verify_screen``.
        screen_rate: share of held-out calibration captions the screen lets through.
        screen_seeds, screen_first_steps: start noises per caption of the screen and the steps its magnitude averages.
        screen_calibration: held-out calibration captions the screen's threshold is taken from (each costs a score).
        verify_screen: also search every caption without the screen and compare (costs the full search).
        calibration_captions: held-out calibration captions (never the evaluation ones, which are the control) searched
            the same way first; each space's delta is lowered to the strictest those captions support (at most
            ``flag_rate`` of them matched to their own image). Delta taken from held-out *images* says how close a novel
            image comes to a member; a caption's generations can come closer than that to its unseen image (a dark
            crop of a photograph drawn for "a dark photo of part of ..."): only captions show that. 0: images only.
        flag_rate: share of held-out images tau and delta may flag (None: the audit's).
        decoded: for a model with a decoder, also confirm a copy against the caption's image's own decoding (with
            the extraction attack's thresholds of that space), so the decoder's floor does not decide the verdict.
        max_cases: extracted cases kept for the report's grid.
    """

    name = "prompt_extraction"
    needs_samples = False

    def __init__(
        self,
        samples_per_caption: int = 16,
        min_clique: int = 3,
        max_captions: int | None = None,
        heldout_captions: int = 16,
        steps: int | None = None,
        tau: float | None = None,
        delta: float | None = None,
        screen: str = "one_step",
        screen_rate: float = 0.1,
        screen_seeds: int = 4,
        screen_first_steps: int = 10,
        screen_calibration: int = 100,
        verify_screen: bool = False,
        calibration_captions: int = 0,
        flag_rate: float | None = None,
        decoded: bool = True,
        max_cases: int = 16,
    ) -> None:
        if screen not in SCREENS:
            raise ValueError(f"prompt_extraction screen must be one of {SCREENS}, got {screen!r}")
        if not 1 < min_clique <= samples_per_caption:
            raise ValueError(f"prompt_extraction needs 1 < min_clique <= samples_per_caption, got {min_clique} and {samples_per_caption}")
        if not 0 < screen_rate < 1:
            raise ValueError(f"prompt_extraction screen_rate must be in (0, 1), got {screen_rate}")
        self.samples_per_caption, self.min_clique, self.max_captions = samples_per_caption, min_clique, max_captions
        self.heldout_captions, self.steps, self.tau, self.delta = heldout_captions, steps, tau, delta
        self.screen, self.screen_rate, self.screen_seeds, self.verify_screen = screen, screen_rate, screen_seeds, verify_screen
        self.screen_first_steps, self.screen_calibration = screen_first_steps, screen_calibration
        self.flag_rate, self.decoded, self.max_cases = flag_rate, decoded, max_cases
        if calibration_captions < 0:
            raise ValueError(f"prompt_extraction calibration_captions must be >= 0, got {calibration_captions}")
        self.calibration_captions = calibration_captions

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]  (the decodings only where it compares with them)
        return copy_signals(self.decoded)

    def check(self, num_members: int, num_heldout: int) -> None:
        if num_heldout < 1:
            raise ValueError("prompt_extraction takes its thresholds from held-out images and searches held-out captions: "
                             "give data.num_heldout > 0")

    def check_sampler(self, steps: int) -> None:
        steps = self.steps or steps
        if self.screen != "none" and self.screen_first_steps >= steps:
            raise ValueError(f"prompt_extraction screens captions over the first {self.screen_first_steps} of {steps} sampler "
                             f"steps: set audit.attacks.prompt_extraction.init_args.screen_first_steps below {steps} (or "
                             "more audit steps)")

    # -- the search -------------------------------------------------------------------------
    def _search(self, context: AuditContext, captions: list[str], pool: dict[str, Tensor], own: list[list[int]],
                limits: dict[str, tuple[float, float]], seed: int) -> _Search:
        """Sample every caption ``samples_per_caption`` times; clique, then match to its own images and to any member.

        ``pool[space]`` are the members then the held-out images in each space (pixels; for a latent model also their
        decodings), ``own[i]`` caption i's rows in it and ``limits[space]`` that space's (tau, delta): a copy is confirmed
        in whichever space finds it, pixels first. A copy is the caption's only when the clique's sample is no farther
        from the caption's image than from any other image of the pool: a held-out caption whose generations copy a
        member that happens to lie within delta of the caption's own image (dark sky beside dark sky, two photos of one
        person) copies that member, not its image, and the member captions are held to the same test.
        """
        k = self.samples_per_caption
        if not captions:
            empty = torch.empty(0, *context.members.shape[1:])
            return _Search([], [], [], [], empty, torch.empty(0, dtype=torch.long), 0)
        prompts = [c for c in captions for _ in range(k)]
        generated = context.sampler(prompts, seed, self.steps)
        samples = generated.images
        labels = generated.labels if generated.labels is not None else torch.zeros(len(samples), dtype=torch.long)
        # generate() numbers distinct prompts in order of appearance, which is the order of `captions`
        flagged, confirmed, copies_member, by_space = [], [], [], []
        for i in range(len(captions)):
            rows = (labels == i).nonzero().squeeze(1)
            group = samples[rows]
            hit, clique, anyone, found = None, False, False, {}
            for space, images in pool.items():
                if len(group) < self.min_clique:
                    break
                tau, delta = limits[space]
                mine = generate_and_filter(group, images[own[i]], None, tau=tau, min_clique=self.min_clique, delta=delta)
                clique |= mine.num_samples_flagged > 0
                anyone |= bool(generate_and_filter(group, images[: len(context.members)], None, tau=tau, min_clique=self.min_clique,
                                                   delta=delta).records)
                others = torch.ones(len(images), dtype=torch.bool)
                others[own[i]] = False
                nearest_other = {r.train_index: float(pairwise_l2(group[[r.sample_index]], images[others]).min()) if others.any()
                                 else float("inf") for r in mine.records}
                attributed = [r for r in mine.records if r.distance <= nearest_other[r.train_index]]
                if attributed:
                    found[space] = min(r.distance for r in attributed)
                if hit is None and attributed:
                    best = min(attributed, key=lambda r: r.distance)
                    hit = {"image": best.train_index, "distance": best.distance, "sample": int(rows[best.sample_index]), "space": space,
                           "nearest_other": nearest_other[best.train_index]}
            flagged.append(clique)
            confirmed.append(hit)
            copies_member.append(anyone)
            by_space.append(found)
        calls = generated.num_drawn * (self.steps or context.steps) * context.model.calls_per_sampling_step
        return _Search(flagged, confirmed, copies_member, by_space, samples, labels, calls)

    def _calibrate_deltas(self, context: AuditContext, pool: dict[str, Tensor], spaces: list[str],
                          limits: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """Search held-out calibration captions; lower each space's delta (in ``limits``) to the strictest they support."""
        offset = len(context.members) + len(context.heldout)  # the pool holds members, held-out, then calibration images
        rows = list(range(min(self.calibration_captions, len(context.calibration))))
        captions = [context.calibration.captions[i] for i in rows]
        searched = self._search(context, captions, pool, [[offset + i] for i in rows], limits, context.seed + 2)
        rate = self.flag_rate if self.flag_rate is not None else context.flag_rate
        out: dict[str, Any] = {"captions": len(captions), "calls": searched.calls}
        for space in spaces:
            tau, delta = limits[space]
            scores = torch.tensor([hit.get(space, math.inf) for hit in searched.by_space])
            threshold = calibrate(f"prompt extraction delta ({space}), from calibration captions", scores, rate, inclusive=True)
            out[space] = {"image_delta": delta, "matched": int(torch.isfinite(scores).sum()), "threshold": threshold.to_dict(),
                          "delta": min(delta, threshold.value)}
            limits[space] = (tau, min(delta, threshold.value))
        return out

    def _copy_criteria(self, context: AuditContext) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """The spaces searched and each one's copy thresholds: the audit's (its extraction attack's, as configured)
        unless this plugin sets tau, delta or its flag rate."""
        spaces = copy_spaces(context, self.decoded)
        if context.copy_thresholds is not None and self.tau is None and self.delta is None and self.flag_rate is None:
            return spaces, {space: dict(context.copy_thresholds(space)) for space in spaces}
        criteria = CopyCriteria(tau=self.tau, delta=self.delta, flag_rate=self.flag_rate)
        return spaces, {space: copy_thresholds(context, criteria, space) for space in spaces}

    def _screened(self, context: AuditContext, captions: list[str]) -> tuple[list[int], dict[str, Any]]:
        """The member captions the screen lets through (highest score first; all without a screen) and its record."""
        screen: dict[str, Any] = {"kind": self.screen}
        if self.screen == "none":
            return list(range(len(captions))), screen
        calibration = list(dict.fromkeys(context.calibration.captions))[: self.screen_calibration]
        scored = caption_scores(context.model, captions + calibration, seeds=self.screen_seeds, first_steps=self.screen_first_steps,
                                steps=self.steps or context.steps,
                                batch_size=context.batch_size, seed=context.seed, cache=context.caption_scores)
        score = scored.of(self.screen)
        threshold = calibrate(f"{self.screen} score above threshold", -score[len(captions):], self.screen_rate, inclusive=False)
        passed = threshold.flags(-score[: len(captions)])
        order = torch.argsort(-score[: len(captions)], stable=True).tolist()  # highest score first
        chosen = [i for i in order if bool(passed[i])]
        screen.update(rate=self.screen_rate, candidates=len(captions), passed=len(chosen), threshold=threshold.to_dict(),
                      screen_calls=scored.calls, screen_calls_spent=scored.calls_spent)
        return chosen, screen

    def run(self, context: AuditContext) -> PromptExtractionReport | None:
        model = context.model
        if model.conditioning != "text" or context.sampler is None:
            return None
        if context.heldout is None or context.heldout.captions is None or context.calibration is None:
            raise ValueError("prompt_extraction needs held-out images with captions (data.num_heldout > 0)")
        spaces, found = self._copy_criteria(context)
        limits = {space: (f["tau"].value, f["delta"].value) for space, f in found.items()}
        captions, copies, member_rows = member_captions(context)
        if self.max_captions is not None:
            captions, copies, member_rows = captions[: self.max_captions], copies[: self.max_captions], member_rows[: self.max_captions]
        held_rows = list(range(min(self.heldout_captions, len(context.heldout))))
        held_captions = [context.heldout.captions[i] for i in held_rows]
        # converted once, not once per caption
        pool = {space: torch.cat([space_images(context, "members", space).float(), space_images(context, "heldout", space).float(),
                                  space_images(context, "calibration", space).float()])
                for space in spaces}
        own = [list(rows) for rows in member_rows]
        held_own = [[len(context.members) + i] for i in held_rows]
        caption_deltas = self._calibrate_deltas(context, pool, spaces, limits) if self.calibration_captions else None
        tau, delta = limits["pixel"]

        chosen, screen = self._screened(context, captions)

        verified = self.screen != "none" and self.verify_screen
        full = self._search(context, captions, pool, own, limits, context.seed) if verified else None
        search = full.restricted(chosen) if full is not None else \
            self._search(context, [captions[i] for i in chosen], pool, [own[i] for i in chosen], limits, context.seed)
        held = self._search(context, held_captions, pool, held_own, limits, context.seed + 1)
        extracted = {chosen[j]: hit for j, hit in enumerate(search.confirmed) if hit is not None}
        # What the report's grid and records show: the screened search's finds, or, where every caption was also
        # searched (verify_screen), everything the full search recovered (the screen's finds are among them).
        shown, shown_search = extracted, search
        if self.screen != "none":
            screen["calls"] = screen["screen_calls"] + search.calls
            if full is not None:
                full_hits = {i: hit for i, hit in enumerate(full.confirmed) if hit is not None}
                full_set = set(full_hits)
                shown, shown_search = full_hits, full
                screen.update(unscreened_calls=full.calls, unscreened_extracted=len(full_set), same_set=full_set == set(extracted),
                              missed=len(full_set - set(extracted)), saving=full.calls / max(1, screen["calls"]),
                              unscreened_planted_found=sum(1 for i in full_set if int(copies[i]) > 1),
                              unscreened_heldout_flagged=sum(1 for hit in held.confirmed if hit is not None))

        planted = [i for i in range(len(captions)) if int(copies[i]) > 1]
        planted_found = sum(1 for i in planted if i in extracted)
        heldout_hits = [hit["distance"] for hit in held.confirmed if hit is not None]
        # The held-out captions are searched without the screen: their like among the members is the full search where
        # it ran. Distances of different spaces are not comparable: the rank test reads them only where one space was.
        compared = shown if full is not None else extracted
        control = ChanceControl.of_evidence("prompt extraction", {i: hit["distance"] for i, hit in compared.items()}, len(captions),
                                            dict(enumerate(heldout_hits)), len(held_captions))
        if len(spaces) > 1:
            control.beyond_control = None
        summary: dict[str, Any] = {
            "samples_per_caption": self.samples_per_caption, "min_clique": self.min_clique, "tau": tau, "delta": delta,
            "caption_deltas": caption_deltas,
            "spaces": spaces, "control": control.to_dict(), "natural_near_copies": natural_near_copies(context),
            "thresholds": {k: found["pixel"][k].to_dict() for k in ("tau", "delta")},
            "searched_member_captions": len(captions), "sampled_member_captions": len(chosen),
            "extracted": len(extracted), "flagged": int(sum(search.flagged)),
            "planted": len(planted), "planted_found": planted_found,
            "planted_recall": planted_found / len(planted) if planted else None,
            "searched_heldout_captions": len(held_captions),
            "heldout_flagged": sum(1 for hit in held.confirmed if hit is not None),
            "heldout_cliques": int(sum(held.flagged)), "heldout_copies_member": int(sum(held.copies_member)),
            "member_calls": search.calls, "heldout_calls": held.calls, "screen": screen,
            "reconstruction_floor": reconstruction_floor(context, delta, decoded="decoded" in spaces),
            "records": [
                {"caption": captions[i], "rows": int(copies[i]), "member": context.data.members.ids[member_rows[i][hit["image"]]],
                 "distance": hit["distance"], "space": hit["space"], "screened": i in extracted,
                 "nearest_other": hit["nearest_other"]}
                for i, hit in sorted(shown.items(), key=lambda kv: kv[1]["distance"])
            ],
            "heldout_records": [
                {"caption": c, "distance": hit["distance"], "space": hit["space"], "nearest_other": hit["nearest_other"]} for c, hit in zip(held_captions, held.confirmed) if hit is not None
            ],
        }
        rates = {"prompt extraction (held-out captions)": summary["heldout_flagged"] / len(held_captions)} if held_captions else {}
        return PromptExtractionReport(summary, rates, self._cases(context, captions, member_rows, copies, shown, shown_search))

    def _cases(self, context: AuditContext, captions, member_rows, copies, extracted: dict[int, dict], search: _Search) -> Cases:
        chosen = sorted(extracted.items(), key=lambda kv: kv[1]["distance"])[: self.max_cases]
        members = context.members
        shape = (0, *members.shape[1:])
        rows = [member_rows[i][hit["image"]] for i, hit in chosen]
        return Cases(
            samples=torch.stack([search.samples[hit["sample"]] for _, hit in chosen]) if chosen else torch.empty(shape),
            nearest=members[rows] if chosen else torch.empty(shape),
            distance=torch.tensor([float(hit["distance"]) for _, hit in chosen]),
            member_ids=[context.data.members.ids[r] for r in rows],
            flagged_by=["prompt" if hit["space"] == "pixel" else "prompt (decoded)" for _, hit in chosen],
            copies=[int(copies[i]) for i, _ in chosen],
            captions=[captions[i] for i, _ in chosen],
        )
