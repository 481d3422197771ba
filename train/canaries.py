"""Input canaries for the black-box one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

m canary examples, unlike the data, are each put into the training set independently with probability 1/2;
the manifest records which by stable id (``canary:...``), so that the auditor can later score every canary and
count how many of its "in"/"out" guesses are right (:mod:`privdiff.eval.one_run`). Canaries are never members
of the user's data: attacks and figures about members never see them.

The built-in canaries are blocky random patterns (an 8 x 8 grid of random cells, one random colour per cell in
RGB), far from any photograph or digit, each with a caption of made-up words for text-to-image models. A folder
of the user's own canaries (``metadata.jsonl`` captions for text models) may be given instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privdiff.membership import ImageTable

__all__ = ["CANARY_PREFIX", "CanaryDraw", "Canaries", "as_canaries", "builtin_canaries", "draw_canaries", "recorded_canaries", "with_classes"]

CANARY_PREFIX = "canary:"
# The inclusion draw is its own random stream: seeded by the data seed (so every process and every resume
# draws the same) mixed with this constant, it shares no draw with the split or anything else.
_INCLUSION_STREAM = 0xCA7A
_PATTERN_STREAM = 0x5EED
_SYLLABLES = ("ka", "zu", "mo", "ri", "te", "vo", "pa", "xi", "lu", "ne", "so", "qua", "bre", "dri", "fo", "gy")


@dataclass
class Canaries:
    """What ``data.canaries`` configures.

    Args:
        count: m, the number of canaries; each is trained on with probability 1/2. The most a one-run audit
            can prove grows like ln(m): a few hundred canaries show an epsilon of about 4 at 95%.
        path: a folder of canary images (captions in its ``metadata.jsonl`` for text models, as
            ``data.caption_column`` reads); None: the built-in patterns.
    """

    count: int = 256
    path: str | None = None

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(f"data.canaries.count must be >= 2 (one-run audits need many canaries), got {self.count}")
        if self.path is not None and not Path(self.path).expanduser().is_dir():
            raise FileNotFoundError(f"data.canaries.path={self.path!r}: canary folder {Path(self.path).expanduser()} does not exist")


@dataclass
class CanaryDraw:
    """The canaries of a run and which of them were put into training (the auditor's secret)."""

    table: ImageTable
    included: torch.Tensor  # (m,) bool

    def manifest_entry(self, spec: Canaries) -> dict[str, Any]:
        ids = self.table.ids
        return {**asdict(spec), "included": [i for i, x in zip(ids, self.included.tolist()) if x],
                "excluded": [i for i, x in zip(ids, self.included.tolist()) if not x]}


def _pseudo_word(rng: np.random.Generator) -> str:
    return "".join(_SYLLABLES[k] for k in rng.integers(0, len(_SYLLABLES), size=3))


def _shapes(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """A background and three filled rectangles or ellipses of random place, size and shade (colour in RGB)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    image = np.empty((channels, size, size))
    image[:] = rng.uniform(0, 1, size=(channels, 1, 1))
    for _ in range(3):
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        hy, hx = rng.uniform(0.12, 0.35, size=2) * size
        if rng.random() < 0.5:
            inside = (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
        else:
            inside = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 <= 1
        image[:, inside] = rng.uniform(0, 1, size=(channels, 1))
    return np.round(image * 255).astype(np.uint8)


def builtin_canaries(count: int, image_size: int, channels: int, captioned: bool = False) -> ImageTable:
    """``count`` synthetic images of random shapes (ids ``canary:0000`` ...), the same for the same size whatever the run."""
    images, captions = [], []
    for index in range(count):
        rng = np.random.default_rng([_PATTERN_STREAM, index])
        images.append(_shapes(rng, image_size, channels))
        captions.append(f"a {_pseudo_word(rng)} {_pseudo_word(rng)} tile pattern")
    return ImageTable(torch.from_numpy(np.stack(images)), torch.full((count,), -1, dtype=torch.long),
                      [f"{CANARY_PREFIX}{i:04d}" for i in range(count)], captions if captioned else None)


def as_canaries(table: ImageTable, spec: Canaries) -> ImageTable:
    """The first ``spec.count`` images of a folder's table (sorted by name) as canaries: ids ``canary:...``, no class."""
    if len(table) < spec.count:
        raise ValueError(f"data.canaries.path={spec.path!r} holds {len(table)} images, fewer than data.canaries.count={spec.count}")
    table = table.select(range(spec.count))
    table.ids = [CANARY_PREFIX + i for i in table.ids]
    table.labels = torch.full((spec.count,), -1, dtype=torch.long)
    return table


def draw_canaries(table: ImageTable, seed: int, num_classes: int = 0) -> CanaryDraw:
    """Draw which canaries go into training: each independently with probability 1/2.

    For a class-conditional model (``num_classes`` > 0) canary i is of class i mod C."""
    rng = np.random.default_rng([_INCLUSION_STREAM, seed])
    return CanaryDraw(with_classes(table, num_classes), torch.from_numpy(rng.random(len(table)) < 0.5))


def with_classes(table: ImageTable, num_classes: int) -> ImageTable:
    """A class-conditional model needs a class for every row: canary i gets class i mod C (unchanged when C = 0)."""
    if num_classes > 0:
        table = table.select(range(len(table)))
        table.labels = torch.arange(len(table)) % num_classes
    return table


def recorded_canaries(entry: dict[str, Any], table: ImageTable, num_classes: int = 0) -> CanaryDraw:
    """The canaries ``table`` (loaded as the manifest's ``canaries`` entry says) with the inclusion it recorded."""
    included, excluded = set(entry["included"]), set(entry["excluded"])
    unknown = [i for i in table.ids if i not in included and i not in excluded]
    if unknown or len(table) != len(included) + len(excluded):
        raise ValueError(f"the manifest's canaries do not match {entry.get('path') or 'the built-in canaries'} (e.g. {unknown[:3]} unrecorded)")
    return CanaryDraw(with_classes(table, num_classes), torch.tensor([i in included for i in table.ids]))
