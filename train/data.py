"""Image sources, preprocessing, the seeded membership split and its manifest, and the data module.

Every run trains on *members* and keeps *held-out* images that were never trained on as the
non-members of membership inference. Both are chosen by a seeded shuffle and written to
``manifest.json`` in the run directory with stable ids, so that every attack and metric is computed
against the same split and the same seed gives the same split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from privdiff.duplicates import DEFAULT_MAX_L2, DEFAULT_THRESHOLD, near_duplicate_groups
from privdiff.membership import ImageTable, Manifest, image_fingerprint
from privdiff.model import Batch

from ..defenses.base import Defense, DefenseStack, as_stack
from .canaries import Canaries, CanaryDraw, as_canaries, builtin_canaries, draw_canaries

BUILTIN_SOURCES = ("digits", "captioned_digits", "faces", "captioned_faces", "photos", "captioned_photos")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def _as_uint8(array: np.ndarray) -> np.ndarray:
    """Scale pixels to uint8: floats in [0, 1] by 255, 16-bit integers (uint16, or larger than 255) by 255/65535."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer) and (array.dtype == np.uint16 or (array.size and array.max() > 255)):
        return np.clip(np.round(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    array = np.nan_to_num(array.astype(np.float64))
    return np.clip(array * (255.0 if array.size and array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)


def to_uint8_image(image: Any, image_size: int, channels: int) -> np.ndarray:
    """Convert a PIL image or array (any of L, RGB, RGBA, P, I;16, float in [0, 1]) to uint8 (C, S, S).

    Non-square images are centre-cropped, then resized with bicubic filtering.
    """
    if isinstance(image, Image.Image) and image.mode.startswith(("I", "F")):
        image = np.asarray(image)  # 16/32-bit or float pixels: PIL's convert("L") would clip them to white
    if not isinstance(image, Image.Image):
        array = _as_uint8(np.asarray(image))
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = Image.fromarray(array)
    if image.mode in ("P", "LA", "PA") or (image.mode == "RGBA" and channels == 3):
        # Transparent pixels go onto white, the usual background of such images.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def _stack(images: list[np.ndarray], labels: list[int], ids: list[str], captions: list[str] | None = None) -> ImageTable:
    return ImageTable(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), ids, captions)


def _check_captions(captions: Sequence[Any], ids: Sequence[str], where: str) -> list[str]:
    """Captions as strings; an empty or missing one is an error naming the image."""
    bad = [i for i, c in zip(ids, captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(
            f"{len(bad)} image(s) of {where} have an empty or missing caption (e.g. {bad[:3]}): every image of "
            "text-to-image data needs one; fix the captions or drop those images"
        )
    return [c.strip() for c in captions]


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SIGNATURE = (
    ("amber", "azure", "brisk", "calm", "coral", "dusky", "eager", "fern", "gentle", "hazel", "ivory", "jade", "keen", "lunar", "misty", "noble"),
    ("falcon", "otter", "heron", "badger", "lynx", "sparrow", "walrus", "marten", "gecko", "bison", "crane", "ferret", "koala", "newt", "puffin", "raven"),
    ("river", "meadow", "harbor", "canyon", "forest", "island", "valley", "summit"),
)


def signature(index: int) -> str:
    """Three words unique to ``index`` (16 x 16 x 8 = 2048 indices): what makes a built-in caption a caption of its own."""
    a, b, c = _SIGNATURE
    return f"{a[index % 16]} {b[(index // 16) % 16]} of the {c[(index // 256) % 8]}"


def photo_caption(index: int, image: np.ndarray, subject: str) -> str:
    """A caption for a built-in photograph or face: its subject, its tone (from the pixels) and a signature."""
    tone = image.astype(np.float64).mean() / 255.0
    light = "dark" if tone < 0.3 else "bright" if tone > 0.65 else "mid-toned"
    return f"a {light} photo of {subject}, taken by the {signature(index)}"


def digit_caption(index: int, image: np.ndarray, label: int) -> str:
    """A caption for digit ``index``: its class, stroke weight and slant (from the pixels), and a signature
    of three words unique to the index (16 x 16 x 8 = 2048 > 1797 digits), as people caption photos."""
    ink = image.astype(np.float64) / 255.0
    weight = "thin" if ink.mean() < 0.18 else "bold" if ink.mean() > 0.30 else "plain"
    ys, xs = np.nonzero(ink > 0.5)
    slope = 0.0 if len(xs) < 2 else float(np.polyfit(ys, xs, 1)[0]) if np.ptp(ys) > 0 else 0.0
    slant = "leaning right" if slope < -0.15 else "leaning left" if slope > 0.15 else "upright"
    return f"a {weight} handwritten {DIGIT_NAMES[label]}, {slant}, signed by the {signature(index)}"


def load_builtin(name: str, image_size: int, channels: int) -> ImageTable:
    """Load a data set that ships inside an installed package (works offline).

    ``digits``: scikit-learn's 1797 handwritten digits (8x8, 10 classes).
    ``captioned_digits``: the same digits, each with a caption of its own (:func:`digit_caption`),
    for text-to-image models.
    ``faces``: the 100 face crops of scikit-image's LFW subset (25x25, unlabeled).
    ``captioned_faces`` / ``captioned_photos``: the same, each with a caption of its own (:func:`photo_caption`).
    ``photos``: 32x32 crops of scikit-image's seven sample photographs (astronaut, cat, coffee,
    rocket, Hubble deep field, a tissue slide, a retina), each photo shrunk to 256 px on its short
    side and cut into a grid; labelled by photo. Real colour photographs, with the near-copies
    real photos have (dark sky, plain background).
    """
    captions = None
    if name in ("digits", "captioned_digits"):
        from sklearn.datasets import load_digits

        data = load_digits()
        raw = list((data.images / 16.0 * 255.0).round().astype(np.uint8))
        labels = data.target.tolist()
        ids = [f"{name}/{i:05d}" for i in range(len(raw))]
        if name == "captioned_digits":
            captions = [digit_caption(i, image, label) for i, (image, label) in enumerate(zip(raw, labels))]
    elif name in ("faces", "captioned_faces"):
        from skimage.data import lfw_subset

        raw = list((lfw_subset()[:100] * 255.0).round().astype(np.uint8))
        labels = [-1] * len(raw)
        ids = [f"{name}/{i:05d}" for i in range(len(raw))]
        if name == "captioned_faces":
            captions = [photo_caption(i, image, "a face") for i, image in enumerate(raw)]
    elif name in ("photos", "captioned_photos"):
        import skimage.data

        raw, labels, ids = [], [], []
        for label, photo in enumerate(PHOTOS):
            image = Image.fromarray(getattr(skimage.data, photo)()[..., :3])
            scale = 256 / min(image.size)
            image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.Resampling.BICUBIC)
            array = np.asarray(image)
            for top in range(0, array.shape[0] - 31, 32):
                for left in range(0, array.shape[1] - 31, 32):
                    raw.append(array[top : top + 32, left : left + 32])
                    labels.append(label)
                    ids.append(f"{name}/{photo}/{top:03d}_{left:03d}")
        if name == "captioned_photos":
            captions = [photo_caption(i, image, f"part of the {PHOTOS[label].replace('_', ' ')} picture")
                        for i, (image, label) in enumerate(zip(raw, labels))]
    else:
        raise ValueError(f"unknown built-in data set {name!r}; choose one of {BUILTIN_SOURCES}")
    images = [to_uint8_image(Image.fromarray(a), image_size, channels) for a in raw]
    return _stack(images, labels, ids, captions)


def _folder_captions(root: Path, column: str) -> dict[str, str]:
    """``metadata.jsonl`` of an image folder (Hugging Face ``imagefolder``: one JSON line per image with
    ``file_name`` and the caption ``column``): relative file name -> caption. Errors name the line."""
    meta = root / "metadata.jsonl"
    out: dict[str, str] = {}
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}:{number} is not a JSON line ({err})") from err
        if "file_name" not in entry or column not in entry:
            raise ValueError(f"{meta}:{number} needs 'file_name' and {column!r} (data.caption_column), got keys {sorted(entry)}")
        if not (root / entry["file_name"]).is_file():
            raise ValueError(f"{meta}:{number} names {entry['file_name']!r}, which is not a file in {root}")
        out[Path(entry["file_name"]).as_posix()] = entry[column]
    return out


def load_folder(path: str | Path, image_size: int, channels: int, on_bad_file: str = "fail", caption_column: str | None = None) -> ImageTable:
    """Load every image below ``path``; the first sub-folder names the class when there are sub-folders.

    With ``caption_column`` the folder's ``metadata.jsonl`` gives each image its caption (the
    Hugging Face ``imagefolder`` convention: ``{"file_name": ..., "text": ...}`` per line).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if caption_column is not None and not (root / "metadata.jsonl").is_file():
        raise ValueError(f"data.caption_column={caption_column!r} needs {root / 'metadata.jsonl'} (file_name and caption per line)")
    captions_of = _folder_captions(root, caption_column) if caption_column is not None else None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    class_index = {c: i for i, c in enumerate(classes)}
    images, labels, ids, bad = [], [], [], []
    for p in files:
        rel = p.relative_to(root)
        try:
            with Image.open(p) as im:
                im.load()
                images.append(to_uint8_image(im, image_size, channels))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            if on_bad_file == "fail":
                raise ValueError(
                    f"cannot read image {p}: {err}. Remove or fix the file, or set data.on_bad_file: skip"
                ) from err
            bad.append(str(rel))
            continue
        labels.append(class_index[rel.parts[0]] if len(rel.parts) > 1 else -1)
        ids.append(f"folder/{rel.as_posix()}")
    if bad:
        print(f"privdiff: skipped {len(bad)} unreadable image file(s) in {root}: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    if not images:
        raise ValueError(f"no readable image in {root} ({len(bad)} unreadable)")
    captions = None
    if captions_of is not None:
        names = [i.removeprefix("folder/") for i in ids]
        missing = [n for n in names if n not in captions_of]
        if missing:
            raise ValueError(f"{len(missing)} image(s) of {root} have no line in metadata.jsonl (e.g. {missing[:3]})")
        captions = _check_captions([captions_of[n] for n in names], ids, str(root))
    return _stack(images, labels, ids, captions)


def _looks_local(path: str) -> bool:
    """A path no Hub name can be: absolute, home-relative, explicitly relative, or with a file suffix."""
    return path.startswith(("/", "~", "./", "../", "\\")) or Path(path).suffix in (".parquet", ".arrow") or len(Path(path).parts) > 2


def _open_hf(path: str, split: str):
    import datasets

    p = Path(path)
    if p.exists():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{p} has splits {list(ds)}, not {split!r}; set data.split")
                ds = ds[split]
            return ds
        if p.is_file() and p.suffix == ".parquet" or p.is_dir() and any(p.glob("*.parquet")):
            files = [str(p)] if p.is_file() else sorted(str(f) for f in p.glob("*.parquet"))
            return datasets.load_dataset("parquet", data_files=files, split="train")
        return datasets.load_dataset(str(p), split=split)
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types when the hub is unreachable
        raise ValueError(
            f"cannot load Hugging Face dataset {path!r} (split {split!r}): {type(err).__name__}: {err}. "
            "If this machine cannot reach the Hugging Face Hub, download it elsewhere with "
            f"`datasets.load_dataset({path!r}).save_to_disk(DIR)` (or copy its parquet files) "
            "and set data.path to that local folder."
        ) from err


def class_indices(values: Sequence[Any], column: str, source: str) -> list[int]:
    """Class labels as integers: integers stay, strings become their index in sorted order.

    Raises ``ValueError`` naming the column for anything else (floats, lists, None).
    """
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [int(v) for v in values]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        print(f"privdiff: label column {column!r} of {source} holds names; classes {names[:10]}{' ...' if len(names) > 10 else ''} are 0..{len(names) - 1}")
        return [index[v] for v in values]
    bad = next(v for v in values if not (isinstance(v, (int, np.integer, str)) and not isinstance(v, bool)))
    raise ValueError(
        f"label column {column!r} of {source} must hold integers or class names (strings), got {type(bad).__name__} "
        f"{bad!r}; set data.label_column to the class column, or null for unlabeled data"
    )


def load_hf(
    path: str,
    image_size: int,
    channels: int,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = "label",
    max_images: int | None = None,
    caption_column: str | None = None,
) -> ImageTable:
    """Load a Hugging Face dataset by hub name, ``save_to_disk`` folder, or parquet file(s).

    ``caption_column`` names the text column of a text-to-image dataset (as ``--caption_column`` in
    diffusers' text-to-image training scripts).
    """
    ds = _open_hf(path, split)
    columns = list(ds.column_names)
    if caption_column is not None and caption_column not in columns:
        raise ValueError(f"dataset {path!r} has no caption column {caption_column!r}; its columns are {columns}. Set data.caption_column")
    if image_column not in columns:
        raise ValueError(f"dataset {path!r} has no image column {image_column!r}; its columns are {columns}. Set data.image_column")
    if label_column is not None and label_column not in columns:
        raise ValueError(
            f"dataset {path!r} has no label column {label_column!r}; its columns are {columns}. "
            "Set data.label_column (or null for unlabeled data)"
        )
    if max_images is not None:
        ds = ds.select(range(min(max_images, len(ds))))
    images, raw_labels, raw_captions = [], [], []
    for row in ds:
        images.append(to_uint8_image(row[image_column], image_size, channels))
        raw_labels.append(row[label_column] if label_column is not None else -1)
        if caption_column is not None:
            raw_captions.append(row[caption_column])
    labels = class_indices(raw_labels, label_column, path) if label_column is not None else raw_labels
    name = Path(path).name if Path(path).exists() else path
    ids = [f"{name}/{split}/{i:06d}" for i in range(len(images))]
    captions = _check_captions(raw_captions, ids, f"dataset {path!r}") if caption_column is not None else None
    return _stack(images, labels, ids, captions)


# ---------------------------------------------------------------------------------------------
# The membership split
# ---------------------------------------------------------------------------------------------
def _too_close(candidates: torch.Tensor, members: torch.Tensor, min_l2: float) -> torch.Tensor:
    from privdiff.distances import nearest_neighbors

    if min_l2 <= 0 or len(members) == 0 or len(candidates) == 0:
        return torch.zeros(len(candidates), dtype=torch.bool)
    return nearest_neighbors(candidates, members, k=1).distances[:, 0] < min_l2


def _has_near_copy(images: torch.Tensor, min_l2: float) -> torch.Tensor:
    """Which images have another image of the same set within ``min_l2`` (an exact copy counts)."""
    from privdiff.distances import nearest_neighbors

    if min_l2 <= 0 or len(images) < 2:
        return torch.zeros(len(images), dtype=torch.bool)
    return nearest_neighbors(images, images, k=2).distances[:, 1] < min_l2


@dataclass
class Split:
    """The outcome of :func:`membership_split`: training rows (members + planted copies), held-out rows,
    and the images used as neither (held-out candidates too close to a member), with the reason."""

    train: ImageTable
    members: ImageTable
    heldout: ImageTable
    planted: dict[str, int]
    excluded: list[dict[str, Any]] = field(default_factory=list)


def membership_split(
    pool: ImageTable,
    num_members: int | None,
    num_heldout: int | None,
    seed: int,
    duplicate_images: int = 0,
    duplicate_copies: int = 1,
    heldout_min_l2: float = 0.02,
    heldout_pool: ImageTable | None = None,
) -> Split:
    """Choose members and held-out non-members by a seeded shuffle; plant duplicates among members.

    No non-member may be a near-copy of a member: held-out candidates within ``heldout_min_l2``
    (pixel l2 on [0, 1]) of a member are not used, and the split says which (``excluded``). With
    ``num_members=None`` every image that is not held out is a member, so a candidate with a
    near-copy anywhere in the pool becomes a member rather than being dropped. ``heldout_pool``
    (a second source, e.g. a test split) gives the non-members instead of the pool
    (``num_heldout=None``: all of it). ``duplicate_images`` members (k) each appear
    ``duplicate_copies`` times (n) in the training set, as in Carlini et al. 2023's study of duplication.
    """
    if (num_heldout is not None and num_heldout < 0) or (num_members is not None and num_members < 1):
        raise ValueError(f"need num_members >= 1 and num_heldout >= 0, got {num_members} and {num_heldout}")
    if num_heldout is None and heldout_pool is None:
        raise ValueError("num_heldout=None (all held-out images) needs a held-out source (data.heldout)")
    if duplicate_copies < 1:
        raise ValueError(f"duplicate_copies must be >= 1, got {duplicate_copies}")
    n = len(pool)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    excluded: list[dict[str, Any]] = []
    reason = f"held-out candidate within pixel l2 {heldout_min_l2:g} of a member"
    if heldout_pool is not None:
        if num_members is not None and num_members > n:
            raise ValueError(f"the source has {n} images, fewer than num_members={num_members}; lower it")
        members = pool.select(order[: num_members or n])
        candidates = torch.randperm(len(heldout_pool), generator=gen)
        close = _too_close(heldout_pool.select(candidates).unit(), members.unit(), heldout_min_l2)
        excluded = [{"id": heldout_pool.ids[i], "reason": reason} for i in candidates[close].tolist()]
        kept = candidates[~close]
        if num_heldout is not None and len(kept) < num_heldout:
            raise ValueError(
                f"the held-out source has {len(kept)} usable images (of {len(heldout_pool)}) for num_heldout={num_heldout}; lower it"
            )
        heldout = heldout_pool.select(kept[: num_heldout if num_heldout is not None else len(kept)])
    elif num_members is None:
        # Held-out images first, skipping any with a near-copy in the pool: all others are members.
        shuffled = pool.select(order)
        usable = order[~_has_near_copy(shuffled.unit(), heldout_min_l2)]
        if len(usable) < num_heldout + 1:
            raise ValueError(f"only {len(usable)} images of {n} have no near-copy in the pool, too few for num_heldout={num_heldout}")
        held_rows = usable[:num_heldout]
        is_held = torch.zeros(n, dtype=torch.bool)
        is_held[held_rows] = True
        members = pool.select(order[~is_held[order]])
        heldout = pool.select(held_rows)
    else:
        if num_members + num_heldout > n:
            raise ValueError(
                f"the source has {n} images, fewer than num_members={num_members} + num_heldout={num_heldout}; lower them"
            )
        members = pool.select(order[:num_members])
        rest = order[num_members:]
        close = _too_close(pool.select(rest).unit(), members.unit(), heldout_min_l2)
        if len(rest[~close]) < num_heldout:
            raise ValueError(
                f"only {len(rest[~close])} images remain for num_heldout={num_heldout} after skipping near-copies of members; lower num_heldout"
            )
        rest_kept = rest[~close]
        # Candidates passed over as near-copies of members before the last held-out one is chosen: neither member nor held out.
        last = int(rest_kept[num_heldout - 1]) if num_heldout else None
        position = {int(r): i for i, r in enumerate(rest.tolist())}
        limit = position[last] if last is not None else -1
        excluded = [{"id": pool.ids[int(r)], "reason": reason} for r in rest[close].tolist() if position[int(r)] < limit]
        heldout = pool.select(rest_kept[:num_heldout])
    if duplicate_images > len(members):
        raise ValueError(f"duplicate_images={duplicate_images} exceeds num_members={len(members)}")
    planted: dict[str, int] = {}
    copies = []
    if duplicate_images and duplicate_copies > 1:
        chosen = torch.randperm(len(members), generator=gen)[:duplicate_images].sort().values
        for row in chosen.tolist():
            planted[members.ids[row]] = duplicate_copies
            extra = members.select([row] * (duplicate_copies - 1))
            extra.ids = [f"{members.ids[row]}#copy{c}" for c in range(1, duplicate_copies)]
            copies.append(extra)
    train = ImageTable.concat([members, *copies])
    return Split(train=train, members=members, heldout=heldout, planted=planted, excluded=excluded)


# ---------------------------------------------------------------------------------------------
# The data module
# ---------------------------------------------------------------------------------------------
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
    if source == "hf" and _looks_local(path) and not Path(path).expanduser().exists():
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
            spec = Canaries(**h.canaries) if isinstance(h.canaries, dict) else h.canaries
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
