"""The audit's shared image signals: computed once per audit from the context, read by every plugin that needs them.

- the members', calibration and held-out images through the model's round trip (``decode(encode(x))``) and the
  reconstruction floor (how close the model's output can come to each member; 0 for a pixel model);
- the copy criteria of Carlini et al. 2023 (tau, delta, the calibrated-l2 threshold) in a space, taken from the
  held-out calibration images or given, with their false-flag rate on the evaluation held-out images.

Plugins ask for these here instead of constructing another plugin; each is computed once per audit and settings
(``AuditContext.memoized``), so extraction, prompt extraction and detection judge copies by the same numbers.
"""

from __future__ import annotations

import copy
from dataclasses import astuple, dataclass, replace
from typing import Any, Mapping

import torch
from torch import Tensor

from privdiff.distances import _pairwise_tiled, _tile_shape, calibrated_l2, l2, nearest_two, resolve_tile_size

from .plugin import AuditContext
from .thresholds import Threshold, calibrate, given

__all__ = ["SIGNALS", "CopyCriteria", "SPACES", "compute_signal", "copy_signals", "copy_thresholds", "floor_note", "has_decoder",
           "lower_bound", "reconstruction_floor", "round_trip", "signal_order", "space_images", "spaces"]

SPACES = ("pixel", "decoded")


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

def spaces(context: AuditContext, decoded: bool) -> list[str]:
    """``["pixel"]``, and ``"decoded"`` where the model has a decoder and ``decoded`` comparison is asked for."""
    return ["pixel", "decoded"] if decoded and has_decoder(context) else ["pixel"]


@dataclass(frozen=True)
class CopyCriteria:
    """Settings of Carlini et al.'s copy criteria; a None threshold is taken from the held-out calibration images.

    Attributes:
        tau: tiled-l2 edge of the clique of generations (§4.2).
        delta: plain l2 that matches a flagged sample to a member.
        calibrated_threshold: the calibrated-l2 check's threshold (§5.1).
        flag_rate: share of real held-out images a calibrated threshold may flag (None: the audit's).
        tile_size: tile side of the tiled l2 (None: see :func:`privdiff.eval.carlini.generate_and_filter`).
        calibrated_n, calibrated_alpha: the calibrated l2's neighbourhood size and weight.
    """

    tau: float | None = None
    delta: float | None = None
    calibrated_threshold: float | None = None
    flag_rate: float | None = None
    tile_size: int | None = None
    calibrated_n: int = 50
    calibrated_alpha: float = 0.5


def copy_thresholds(context: AuditContext, criteria: CopyCriteria, space: str = "pixel") -> dict[str, Threshold]:
    """tau, delta and the calibrated-l2 threshold of one space: given, or calibrated on the calibration images.

    In the ``decoded`` space the members, the calibration and the held-out images are all passed through the
    model's round trip. Computed once per audit for these criteria; each caller gets its own copies.
    """
    if space not in SPACES:
        raise ValueError(f"extraction space must be one of {SPACES}, got {space!r}")
    rate = criteria.flag_rate if criteria.flag_rate is not None else context.flag_rate
    key = ("copy thresholds", space, *astuple(replace(criteria, flag_rate=rate)))
    return copy.deepcopy(context.memoized(key, lambda: _thresholds(context, criteria, rate, space)))


def _thresholds(context: AuditContext, criteria: CopyCriteria, rate: float, space: str) -> dict[str, Threshold]:
    members, shard = space_images(context, "members", space), context.shard

    def scores(x: Tensor) -> dict[str, Tensor]:
        d1, _, _ = nearest_two(x, members, shard=shard)
        cal = calibrated_l2(x, members, n=criteria.calibrated_n, alpha=criteria.calibrated_alpha, shard=shard).score
        return {"tau": _tiled_nearest(x, members, criteria.tile_size), "delta": d1, "calibrated_threshold": cal}

    where = "" if space == "pixel" else ", against the members' decodings"
    named = {"tau": (f"tiled l2 <= tau (clique edge{where})", True), "delta": (f"l2 <= delta (match to a member{where})", True),
             "calibrated_threshold": (f"calibrated l2 < threshold{where}", False)}
    calibration_images = space_images(context, "calibration", space)
    calibration = scores(calibration_images) if calibration_images is not None else None
    out = {}
    for key, (criterion, inclusive) in named.items():
        value = getattr(criteria, key)
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


def _decodings(context: AuditContext) -> None:
    if has_decoder(context):
        for which in ("calibration", "heldout"):
            space_images(context, which, "decoded")


def _copy_thresholds(context: AuditContext) -> None:
    if context.copy_thresholds is not None and len(context.members):
        context.copy_thresholds("pixel")


# What a plugin may list in ``AuditPlugin.needs``, in the order the runner computes them (later ones read earlier ones).
SIGNALS = {
    "decodings": _decodings,  # every image set through the model's round trip (a model with a decoder)
    "reconstruction_floor": lambda context: has_decoder(context),  # the members' l2 to their own decodings
    "copy_thresholds": _copy_thresholds,  # the audit's copy criteria on pixels (decoded: when first asked)
}


def copy_signals(decoded: bool) -> tuple[str, ...]:
    """What a plugin that confirms copies reads: the floor and the copy criteria, and the decodings where it compares
    with them (``decoded``)."""
    return ("decodings", "reconstruction_floor", "copy_thresholds") if decoded else ("reconstruction_floor", "copy_thresholds")


def signal_order(names: set[str] | frozenset[str]) -> list[str]:
    """The declared signals in the order they are computed; an unknown name is an error naming the known ones."""
    unknown = set(names) - set(SIGNALS)
    if unknown:
        raise ValueError(f"unknown audit signal(s) {sorted(unknown)}: a plugin's needs are among {list(SIGNALS)}")
    return [name for name in SIGNALS if name in names]


def compute_signal(name: str, context: AuditContext) -> None:
    """Compute one signal into the audit's cache (plugins then read it through the functions of this module)."""
    SIGNALS[name](context)
