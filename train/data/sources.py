"""Image sources: the built-in sets (offline), image folders (captions in ``metadata.jsonl``) and Hugging Face
datasets, converted to uint8 tables of one size and channel count with stable ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from privdiff.membership import ImageTable

from .captions import digit_caption, photo_caption


BUILTIN_SOURCES = ("digits", "captioned_digits", "faces", "captioned_faces", "photos", "captioned_photos")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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


def looks_local(path: str) -> bool:
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
