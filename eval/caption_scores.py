"""Per-caption memorization scores of a text-to-image model from its first denoising steps, and the members' captions.

- **Noise-difference magnitude** (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating
  Memorization in Diffusion Models", Sec. 3): a memorized caption pulls the noise prediction far
  from the unconditional one, whatever the start noise. The score is
  ``mean_seeds mean_k ||eps(x_tk, c) - eps(x_tk, "")||``, RMS over the latent, over the first
  ``first_steps`` steps of a deterministic DDIM trajectory; higher = more memorized.
- **One-step consistency** (Webster 2023, "A Reproducible Extraction of Training Images from
  Diffusion Models"): a memorized caption gives the same one-step estimate of x0 from any start
  noise. The score is minus the mean pairwise l2 between the decoded x0 estimates of the seeds,
  taken at the last of the ``first_steps`` steps; higher = more memorized.

An audit signal: the detection plugin and prompt extraction's screen share the scores of one audit
(``AuditContext.caption_scores``), so a caption scored by one is not scored again by the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from privdiff.model import DiffusionModel

from .plugin import AuditContext

__all__ = ["CaptionScores", "SCORES", "caption_scores", "first_timesteps", "member_captions", "natural_near_copies"]


SCORES = ("magnitude", "one_step")


def first_timesteps(num_train_timesteps: int, steps: int, count: int) -> list[int]:
    """The first ``count`` timesteps of an evenly spaced ``steps``-step sampler (DDIM's "trailing" spacing from T - 1)."""
    if count > steps:
        raise ValueError(f"the first {count} timesteps of a {steps}-step sampler do not exist: score over fewer first steps "
                         "than the sampler has (first_steps < steps)")
    stride = max(1, num_train_timesteps // steps)
    return [num_train_timesteps - 1 - k * stride for k in range(count)]


@dataclass
class CaptionScores:
    """Per-caption detection scores (higher = more memorized) and what they cost."""

    captions: list[str]
    magnitude: Tensor  # (n,) Wen et al.'s noise-difference magnitude
    one_step: Tensor  # (n,) Webster's one-step consistency (minus the spread of the seeds' x0 estimates after first_steps)
    calls: int  # noise-predictor calls the scores cost (conditional + unconditional, per image)
    calls_spent: int = -1  # of those, spent by this call (the rest came from the audit's cache); -1: all of them

    def __post_init__(self) -> None:
        if self.calls_spent < 0:
            self.calls_spent = self.calls

    def of(self, name: str) -> Tensor:
        return {"magnitude": self.magnitude, "one_step": self.one_step}[name]


def _caption_seed(caption: str, seed: int) -> int:
    """A caption's own noise seed: its start noises depend on the caption and ``seed`` only, not on what is scored beside it."""
    digest = hashlib.sha256(f"{seed}\x00{caption}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def caption_scores(
    model: DiffusionModel,
    captions: Sequence[str],
    *,
    seeds: int = 4,
    first_steps: int = 1,
    steps: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    cache: dict[Any, tuple[float, float]] | None = None,
) -> CaptionScores:
    """Wen et al.'s magnitude and Webster's one-step consistency of each caption, from ``seeds`` start noises.

    A caption's start noises come from its own CPU generator, seeded from ``seed`` and the caption
    text, so its scores depend on nothing else scored with it, and two plugins of one audit that
    score a caption with the same settings get the same numbers: pass them one ``cache`` (the
    audit's ``AuditContext.caption_scores``) and a caption scored once is not scored again. ``calls``
    counts what scoring every caption costs whether or not it came from the cache (what the score
    costs on its own); ``calls_spent`` what this call spent.
    """
    if model.conditioning != "text":
        raise ValueError("memorization detection compares text-conditional and unconditional noise predictions: it needs a text-to-image model")
    if seeds < 2 or first_steps < 1:
        raise ValueError(f"need seeds >= 2 (the one-step score compares seeds) and first_steps >= 1, got {seeds} and {first_steps}")
    captions = list(captions)
    cache = {} if cache is None else cache
    key = (id(model), seeds, first_steps, steps, seed)  # one audit scores one model; id() keeps two models apart
    todo = list(dict.fromkeys(c for c in captions if (key, c) not in cache))
    if todo:
        for caption, scores in zip(todo, _score(model, todo, seeds, first_steps, steps, batch_size, seed)):
            cache[(key, caption)] = scores
    magnitude = torch.tensor([cache[(key, c)][0] for c in captions])
    one_step = torch.tensor([cache[(key, c)][1] for c in captions])
    per_caption = 2 * seeds * first_steps
    return CaptionScores(captions, magnitude, one_step, calls=per_caption * len(captions), calls_spent=per_caption * len(todo))


def _score(model: DiffusionModel, captions: list[str], seeds: int, first_steps: int, steps: int, batch_size: int,
           seed: int) -> list[tuple[float, float]]:
    """(magnitude, one-step consistency) of each caption: the DDIM trajectories of its own start noises."""
    n = len(captions)
    device = model.device
    noise = torch.cat([torch.randn((seeds, *model.latent_shape), generator=torch.Generator().manual_seed(_caption_seed(c, seed)))
                       for c in captions])
    abar = model.alphas_cumprod()
    ts = first_timesteps(model.num_train_timesteps, steps, first_steps + 1)
    magnitude = torch.zeros(n * seeds)
    x0_pixels: list[Tensor] = []
    rows_per_batch = max(1, batch_size // 2)
    for start in range(0, n * seeds, rows_per_batch):
        rows = range(start, min(n * seeds, start + rows_per_batch))
        x = noise[rows.start : rows.stop].to(device)
        b = x.shape[0]
        both = model.embed_condition([captions[r // seeds] for r in rows] + [""] * b)
        for k in range(first_steps):
            t = ts[k]
            eps = model.predict_noise(torch.cat([x, x]), torch.full((2 * b,), t, device=device, dtype=torch.long), both).float()
            cond, uncond = eps[:b], eps[b:]
            magnitude[rows.start : rows.stop] += (cond - uncond).flatten(1).pow(2).mean(1).sqrt().cpu() / first_steps
            x0 = (x - (1 - abar[t]).sqrt() * cond) / abar[t].sqrt()
            if k == first_steps - 1:
                x0_pixels.append(model.decode(x0).flatten(1).float().cpu())
            x = abar[ts[k + 1]].sqrt() * x0 + (1 - abar[ts[k + 1]]).sqrt() * cond  # DDIM, eta = 0
    pixels = torch.cat(x0_pixels).view(n, seeds, -1)
    pair = torch.cdist(pixels, pixels) / pixels.shape[-1] ** 0.5  # RMS l2 between the seeds' estimates
    spread = pair.sum((1, 2)) / (seeds * (seeds - 1))
    return list(zip(magnitude.view(n, seeds).mean(1).tolist(), (-spread).tolist()))


def member_captions(context: AuditContext) -> tuple[list[str], Tensor, list[list[int]]]:
    """The members' distinct captions, most training rows first: (captions, rows of each, member rows of each).

    A caption's training rows are those of one image with that caption: the most, over the groups of near-copies,
    of the summed copies of the group's members that carry the caption (a planted pair duplicated 10x has 10 rows;
    two photos of one person with different captions are a near-copy group but 1 row each, not a duplicated pair).
    """
    captions = context.data.members.captions
    if captions is None:
        raise ValueError("the members have no captions")
    copies, groups = context.data.copies.long(), context.data.group_of()
    rows: dict[str, list[int]] = {}
    pair_rows: dict[tuple[str, int], int] = {}
    for i, c in enumerate(captions):
        rows.setdefault(c, []).append(i)
        key = (c, int(groups[i]))
        pair_rows[key] = pair_rows.get(key, 0) + int(copies[i])
    top: dict[str, int] = {}
    for (c, _), k in pair_rows.items():
        top[c] = max(top.get(c, 0), k)
    ordered = sorted(rows, key=lambda c: -top[c])  # stable: ties keep the order of first appearance
    return ordered, torch.tensor([top[c] for c in ordered]), [rows[c] for c in ordered]


def natural_near_copies(context: AuditContext) -> int:
    """Groups of near-copies among the members whose captions differ (two photos of one person, captioned apart):
    near-copies of one image, but no duplicated image-caption pair."""
    captions = context.data.members.captions
    if captions is None:
        return 0
    by_group: dict[int, set[str]] = {}
    for i, g in enumerate(context.data.group_of().tolist()):
        by_group.setdefault(int(g), set()).add(captions[i])
    return sum(1 for c in by_group.values() if len(c) > 1)
