"""What a run's data are: images held in memory with stable ids, and the membership manifest.

Every run trains on *members* and keeps *held-out* images that were never trained on as the
non-members of membership inference. ``privdiff.train.data`` chooses them; the manifest records
the choice by stable id (with a fingerprint of the pixels) so that every attack and metric, a
resume and a later audit all see the same split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .files import write_json_atomic

__all__ = ["ImageTable", "Manifest", "MANIFEST_VERSION", "copies_per_member", "image_fingerprint"]

MANIFEST_VERSION = 3  # 2: member groups of near-copies, excluded images; 3: input canaries
SUPPORTED_VERSIONS = (1, 2, 3)  # a version-1 manifest reads with no groups


# ---------------------------------------------------------------------------------------------
# In-memory images with stable ids
# ---------------------------------------------------------------------------------------------
class ImageTable(Dataset):
    """Images held in memory as uint8 (N, C, H, W), with int64 labels (-1 = none), stable string ids and,
    for text-to-image data, one caption per image.

    Items are ``(image in [0, 1], label, row)`` (tensors only, as Opacus's Poisson loader needs);
    ``row`` lets a training step know which example it saw, and, for captioned data, its caption
    (the data module looks it up before the batch reaches the model). The model maps pixels to
    its own space (``encode``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: Sequence[str], captions: Sequence[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images) or len(ids) != len(images):
            raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(ids)} ids must match")
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images = images
        self.labels = labels.long()
        self.ids = list(ids)
        self.captions = None if captions is None else [str(c) for c in captions]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[row].float().div(255.0), self.labels[row], torch.tensor(row)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "ImageTable":
        """Return the table restricted to ``rows`` (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        captions = None if self.captions is None else [self.captions[i] for i in rows.tolist()]
        return ImageTable(self.images[rows], self.labels[rows], [self.ids[i] for i in rows.tolist()], captions)

    def unit(self) -> torch.Tensor:
        """Return the images as float in [0, 1] (the scale every distance is defined on)."""
        return self.images.float().div(255.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @staticmethod
    def concat(tables: Sequence["ImageTable"]) -> "ImageTable":
        with_captions = [t.captions is not None for t in tables]
        if any(with_captions) and not all(with_captions):
            raise ValueError("cannot join tables with captions and tables without")
        return ImageTable(
            torch.cat([t.images for t in tables]),
            torch.cat([t.labels for t in tables]),
            [i for t in tables for i in t.ids],
            [c for t in tables for c in t.captions] if all(with_captions) and tables else None,
        )


# ---------------------------------------------------------------------------------------------
# The membership manifest
# ---------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """Who is a member, who is held out, what was planted and what a defense removed (stable ids)."""

    seed: int
    source: dict[str, Any]
    image_shape: list[int]
    num_classes: int
    members: list[str]
    heldout: list[str]
    train: list[str] = field(default_factory=list)
    planted_duplicates: dict[str, int] = field(default_factory=dict)
    removed: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""  # image_fingerprint(members, held-out): the pixels the ids stood for ("" in older manifests)
    groups: list[list[str]] = field(default_factory=list)  # members that are near-copies of each other (2+ ids each)
    excluded: list[dict[str, Any]] = field(default_factory=list)  # images neither member nor held out, and why
    captions: dict[str, str] = field(default_factory=dict)  # member id -> caption (or "sha256:..." when kept out)
    # input canaries of the one-run audit: their settings and which ids were put into training ({} when none)
    canaries: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def record_removed(self, removed_id: str, kept_id: str, defense: str, **extra: Any) -> None:
        """Note that ``defense`` dropped ``removed_id`` from training, keeping ``kept_id`` instead."""
        self.removed.append({"id": removed_id, "kept": kept_id, "defense": defense, **extra})

    def membership_key(self) -> dict[str, Any]:
        """The part that must never change between a run and its resume or audit."""
        return {k: getattr(self, k) for k in ("seed", "members", "heldout", "train", "planted_duplicates", "canaries")}

    def check_fingerprint(self, fingerprint: str, where: Any) -> None:
        """Raise ``ValueError`` when ``fingerprint`` (of the members and held-out images now) is not the recorded one."""
        if self.fingerprint and fingerprint != self.fingerprint:
            raise ValueError(
                f"the images behind the manifest's ids in {where} changed since it was written (same ids, other "
                "pixels: edited or replaced files, or another image_size/channels). Restore the original data, or "
                "train into a new run directory"
            )

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (a crash mid-write leaves the previous file)."""
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no membership manifest at {path}; it is written by `privdiff fit` into the run directory")
        data = json.loads(path.read_text())
        if data.get("version") not in SUPPORTED_VERSIONS:
            raise ValueError(f"{path}: manifest version {data.get('version')} is not supported (expected one of {SUPPORTED_VERSIONS})")
        return cls(**data)

    def group_index(self, members: "ImageTable") -> torch.Tensor:
        """For each member (in ``members``' order), the row of its group's first member: near-copies share one."""
        row = {image_id: i for i, image_id in enumerate(members.ids)}
        out = torch.arange(len(members))
        for group in self.groups:
            rows = sorted(row[i] for i in group if i in row)
            for r in rows:
                out[r] = rows[0]
        return out


def image_fingerprint(*tables: "ImageTable") -> str:
    """SHA-256 of the tables' uint8 pixels, shapes and ids, in order (what a manifest's ids stood for)."""
    digest = hashlib.sha256()
    for table in tables:
        digest.update(repr((tuple(table.images.shape), table.ids)).encode())
        digest.update(table.images.contiguous().numpy().tobytes())
        if table.captions is not None:  # captions are part of a text-to-image example
            digest.update("\x00".join(table.captions).encode())
    return digest.hexdigest()


def copies_per_member(manifest: Manifest, members: ImageTable) -> torch.Tensor:
    """How many copies of each member the final training set holds (0 when a defense removed all)."""
    counts: dict[str, int] = {}
    for tid in manifest.train:
        base = tid.split("#copy")[0]
        counts[base] = counts.get(base, 0) + 1
    return torch.tensor([counts.get(i, 0) for i in members.ids], dtype=torch.long)
