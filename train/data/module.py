"""The data module: loads a source, splits it, writes the manifest, applies the data-stage defenses, and serves batches."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from privdiff.duplicates import DEFAULT_MAX_L2, DEFAULT_THRESHOLD, near_duplicate_groups
from privdiff.membership import ImageTable, Manifest, image_fingerprint
from privdiff.model import Batch

from ...defenses.base import Defense, DefenseStack, as_stack
from ..canaries import Canaries, CanaryDraw, as_canaries, builtin_canaries, draw_canaries
from .sources import BUILTIN_SOURCES, looks_local, load_builtin, load_folder, load_hf
from .split import membership_split


@dataclass
class HeldoutSource:
    """A second source of images used as the non-members (a real test split), instead of part of the pool.

    Args:
        source, path, split, image_column, label_column, max_images: as for the data module's
            own source (``folder``, ``hf``, or a built-in set); the images are converted to the
            same size and channels.
    """

    source: Literal["digits", "captioned_digits", "faces", "captioned_faces", "photos", "captioned_photos", "hf", "folder"] = "folder"
    path: str | None = None
    split: str = "test"
    image_column: str = "image"
    label_column: str | None = "label"
    max_images: int | None = None
    caption_column: str | None = None


def load_source(
    source: str, path: str | None, image_size: int, channels: int, split: str = "train", image_column: str = "image",
    label_column: str | None = "label", max_images: int | None = None, on_bad_file: str = "fail",
    caption_column: str | None = None,
) -> ImageTable:
    """Every image of one source: a built-in set, a folder, or a Hugging Face dataset."""
    if source in BUILTIN_SOURCES:
        return load_builtin(source, image_size, channels)
    if source == "folder":
        return load_folder(path, image_size, channels, on_bad_file, caption_column)
    return load_hf(path, image_size, channels, split, image_column, label_column, max_images, caption_column)


def _check_source(source: str, path: str | None, where: str) -> None:
    if source not in (*BUILTIN_SOURCES, "hf", "folder"):
        raise ValueError(f"{where}.source must be one of {(*BUILTIN_SOURCES, 'hf', 'folder')}, got {source!r}")
    if source in ("hf", "folder") and not path:
        raise ValueError(f"{where}.source={source!r} needs {where}.path (a hub name, local dataset or folder)")
    if source == "folder" and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"{where}.path={path!r}: image folder {Path(path).expanduser()} does not exist")
    if source == "hf" and looks_local(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"{where}.path={path!r} does not exist: give a local dataset (a save_to_disk folder or parquet files) or a "
            "Hugging Face Hub name such as uoft-cs/cifar10"
        )


def load_canaries(spec: Canaries, image_size: int, channels: int, captioned: bool = False, caption_column: str = "text") -> ImageTable:
    """A run's input canaries: the built-in shapes, or the first ``spec.count`` images of the folder ``spec.path``."""
    if spec.path is None:
        return builtin_canaries(spec.count, image_size, channels, captioned)
    return as_canaries(load_folder(spec.path, image_size, channels, caption_column=caption_column if captioned else None), spec)


HELDOUT_PREFIX = "heldout:"  # ids of a second held-out source: never equal to a pool id


class DiffusionDataModule(pl.LightningDataModule):
    """Loads images, splits members from held-out non-members, applies data-stage defenses.

    Args:
        source: ``digits``, ``faces`` or ``photos`` (built in, offline; see :func:`load_builtin`), ``hf`` (``path`` = hub name, a
            ``save_to_disk`` folder or parquet files) or ``folder`` (``path`` = a folder of images).
        path: where ``hf`` and ``folder`` sources are.
        image_size: side of the square images the model sees.
        channels: 1 (grayscale) or 3 (RGB); every image is converted.
        num_members: images trained on (None: all but the held-out ones; a pool image with a
            near-copy elsewhere in the pool is then a member, never silently dropped).
        num_heldout: images never trained on, the non-members of membership inference (None with
            ``heldout``: every usable image of that source).
        duplicate_images: how many members to plant as duplicates (k).
        duplicate_copies: how many times each planted member appears in training (n).
        seed: seeds the split; the same seed gives the same manifest.
        batch_size: training batch size of all processes together (the expected batch under DP-SGD's
            Poisson sampling); under DDP each of W processes loads batch_size / W.
        defenses: data- and training-stage defenses (shared with the model).
        run_dir: where ``manifest.json`` goes; defaults to the trainer's ``default_root_dir``.
        max_images: read at most this many images from an ``hf`` source.
        on_bad_file: ``fail`` or ``skip`` unreadable files of a ``folder`` source.
        heldout_min_l2: held-out candidates closer than this to a member are not used (the manifest
            lists them under ``excluded``).
        heldout: a second source for the non-members (e.g. the data set's test split); default:
            the held-out images come from the pool, by the seeded split.
        group_hamming, group_max_l2: members that are near-copies of each other by this criterion
            (phash Hamming distance and pixel l2, as deduplication's) form one group for the audit:
            one image, whatever the number of files.
        caption_column: text-to-image data: the caption column of an ``hf`` dataset, or of a
            ``folder``'s ``metadata.jsonl`` (``text`` in the ``imagefolder`` convention). The built-in
            ``captioned_digits`` carry their own. A member's copies keep its caption.
        caption_privacy: ``plain`` writes each member's caption into the manifest, ``hash`` only its
            SHA-256 (the captions then stay out of the run directory).
        canaries: input canaries for the black-box one-run audit (:mod:`privdiff.train.canaries`): each is
            trained on with probability 1/2, the manifest records which; they are never members.
    """

    def __init__(
        self,
        source: Literal["digits", "captioned_digits", "faces", "captioned_faces", "photos", "captioned_photos", "hf", "folder"] = "digits",
        path: str | None = None,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        image_size: int = 16,
        channels: Literal[1, 3] = 1,
        num_members: int | None = 64,
        num_heldout: int | None = 64,
        duplicate_images: int = 0,
        duplicate_copies: int = 1,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        defenses: list[Defense] | None = None,
        run_dir: str | None = None,
        max_images: int | None = None,
        on_bad_file: Literal["fail", "skip"] = "fail",
        heldout_min_l2: float = 0.02,
        heldout: HeldoutSource | None = None,
        group_hamming: int = DEFAULT_THRESHOLD,
        group_max_l2: float = DEFAULT_MAX_L2,
        caption_column: str | None = None,
        caption_privacy: Literal["plain", "hash"] = "plain",
        canaries: Canaries | None = None,
    ) -> None:
        super().__init__()
        if isinstance(heldout, dict):  # as the manifest records it
            heldout = HeldoutSource(**heldout)
        if isinstance(canaries, dict):
            canaries = Canaries(**canaries)
        _check_source(source, path, "data")
        if heldout is not None:
            _check_source(heldout.source, heldout.path, "data.heldout")
        if num_heldout is None and heldout is None:
            raise ValueError("data.num_heldout: null (every held-out image) needs data.heldout, a second source")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}")
        if caption_privacy not in ("plain", "hash"):
            raise ValueError(f"data.caption_privacy must be 'plain' or 'hash', got {caption_privacy!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(ignore=["defenses"])
        self.defenses: DefenseStack = as_stack(defenses)
        self.manifest: Manifest | None = None
        self.train_set: ImageTable | None = None
        self.members: ImageTable | None = None
        self.heldout: ImageTable | None = None
        self.pool: ImageTable | None = None
        self.canaries: CanaryDraw | None = None

    # -- loading -------------------------------------------------------------------------------
    def load_pool(self) -> ImageTable:
        """Load every image of the configured source (before the split)."""
        h = self.hparams
        return load_source(h.source, h.path, h.image_size, h.channels, h.split, h.image_column, h.label_column, h.max_images,
                           h.on_bad_file, h.caption_column)

    def load_heldout_source(self) -> ImageTable | None:
        """The second source's images (ids prefixed ``heldout:``), or None when non-members come from the pool."""
        h, spec = self.hparams, self.hparams.heldout
        if spec is None:
            return None
        if isinstance(spec, dict):
            spec = HeldoutSource(**spec)
        table = load_source(spec.source, spec.path, h.image_size, h.channels, spec.split, spec.image_column,
                            spec.label_column, spec.max_images, h.on_bad_file, spec.caption_column or h.caption_column)
        table.ids = [HELDOUT_PREFIX + i for i in table.ids]
        return table

    @property
    def run_dir(self) -> Path | None:
        if self.hparams.run_dir:
            return Path(self.hparams.run_dir)
        trainer = self.trainer
        return Path(trainer.default_root_dir) if trainer is not None else None

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        h = self.hparams
        pool = self.load_pool()
        split = membership_split(
            pool, h.num_members, h.num_heldout, h.seed, h.duplicate_images, h.duplicate_copies, h.heldout_min_l2,
            heldout_pool=self.load_heldout_source(),
        )
        labels = pool.labels[pool.labels >= 0]
        roots = near_duplicate_groups(split.members.images, threshold=h.group_hamming, max_l2=h.group_max_l2)
        groups: dict[int, list[str]] = {}
        for row, root in enumerate(roots):
            groups.setdefault(root, []).append(split.members.ids[row])
        manifest = Manifest(
            seed=h.seed,
            source={k: v for k, v in dict(h).items() if k not in ("run_dir", "num_workers") and not k.startswith("_")},
            image_shape=list(pool.image_shape),
            num_classes=int(labels.max()) + 1 if len(labels) else 0,
            members=split.members.ids,
            heldout=split.heldout.ids,
            planted_duplicates=split.planted,
            fingerprint=image_fingerprint(split.members, split.heldout),
            groups=[ids for ids in groups.values() if len(ids) > 1],
            excluded=split.excluded,
            captions=self._manifest_captions(split.members),
        )
        train, canaries = split.train, None
        if h.canaries is not None:
            spec = Canaries(**h.canaries) if isinstance(h.canaries, dict) else h.canaries  # hparams keep what the CLI gave
            table = load_canaries(spec, h.image_size, h.channels, pool.captions is not None, h.caption_column or "text")
            canaries = draw_canaries(table, h.seed, manifest.num_classes)
            manifest.canaries = canaries.manifest_entry(spec)
            # before the data defenses: the canaries test the whole pipeline, dedup included
            train = ImageTable.concat([train, canaries.table.select(canaries.included.nonzero().flatten())])
        train = self.defenses.transform_dataset(train, manifest)
        manifest.train = train.ids
        self._agree_across_processes(manifest)
        self._check_against_saved(manifest)
        self.defenses.on_data_ready(len(train), h.batch_size)
        self.manifest, self.train_set, self.members, self.heldout = manifest, train, split.members, split.heldout
        self.pool, self.canaries = pool, canaries
        if self.run_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            manifest.save(self.run_dir / "manifest.json")  # once, by rank 0: every rank holds the same

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Captioned data: the loader's ``(images, labels, rows)`` tensors become a ``Batch`` with each row's caption.

        Here rather than in the loader's collate: Opacus's Poisson loader builds an empty batch from
        the structure of the first one and accepts tensors only, not strings.
        """
        train = self.train_set
        if train is None or train.captions is None or isinstance(batch, Batch):
            return batch
        images, _, rows = batch
        rows = torch.as_tensor(rows).long()
        return Batch(images, [train.captions[int(r)] for r in rows.tolist()], rows)

    def public_images(self) -> ImageTable | None:
        """Images of the source that are neither members, held out, nor excluded: nothing of the membership
        question depends on them (a latent model's autoencoder learns from them). None if there are none."""
        if self.manifest is None or self.pool is None:
            return None
        used = set(self.manifest.members) | set(self.manifest.heldout) | {e["id"] for e in self.manifest.excluded}
        rows = [i for i, image_id in enumerate(self.pool.ids) if image_id not in used]
        return self.pool.select(rows) if rows else None

    def _manifest_captions(self, members: ImageTable) -> dict[str, str]:
        if members.captions is None:
            return {}
        if self.hparams.caption_privacy == "hash":
            return {i: "sha256:" + hashlib.sha256(c.encode()).hexdigest() for i, c in zip(members.ids, members.captions)}
        return dict(zip(members.ids, members.captions))

    def _agree_across_processes(self, manifest: Manifest) -> None:
        """Under DDP every process builds the split (and dedup) itself: refuse to train unless all equal rank 0's."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return
        key = hashlib.sha256(json.dumps(asdict(manifest), sort_keys=True, default=str).encode()).hexdigest()
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(key == strategy.broadcast(key, src=0), all=True):
            raise ValueError(
                f"the {trainer.world_size} processes built different manifests (members, held-out set, dedup "
                "result or pixels): every node must read the same data with the same settings"
            )

    def _check_against_saved(self, manifest: Manifest) -> None:
        """A resumed run must see the very split it started with."""
        if self.run_dir is None or not (self.run_dir / "manifest.json").is_file():
            return
        saved = Manifest.load(self.run_dir / "manifest.json")
        if saved.membership_key() != manifest.membership_key():
            raise ValueError(
                f"the data no longer match the manifest in {self.run_dir} (different members, held-out set "
                "or dedup result). Restore the original data and settings, or train into a new run directory"
            )
        saved.check_fingerprint(manifest.fingerprint, self.run_dir / "manifest.json")

    # -- loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Batches of ``batch_size`` rows in all: under DDP each of the W processes loads ``batch_size / W``
        (Lightning's distributed sampler shares out the rows), or draws its share of one Poisson batch (DP-SGD)."""
        if self.train_set is None:
            self.setup("fit")
        world = self.trainer.world_size if self.trainer is not None else 1
        batch_size = min(self.hparams.batch_size, len(self.train_set))
        loader = DataLoader(
            self.train_set,
            batch_size=max(1, batch_size // world),
            shuffle=True,
            drop_last=False,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )
        wrapped = self.defenses.wrap_train_loader(loader)
        if wrapped is loader and batch_size % world:
            raise ValueError(
                f"data.batch_size={batch_size} is the batch of all {world} processes together and must split "
                f"evenly among them; use a multiple of {world}, e.g. {batch_size // world * world or world}"
            )
        return wrapped

    @property
    def num_classes(self) -> int:
        if self.manifest is None:
            self.setup()
        return self.manifest.num_classes
