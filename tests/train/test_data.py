"""Data sources, conversion, the membership split and its manifest, and the errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.train.data import (
    DiffusionDataModule,
    ImageTable,
    Manifest,
    load_builtin,
    load_folder,
    load_hf,
    membership_split,
    to_uint8_image,
)


def _random_images(n: int, size: int = 12, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("name,count", [("digits", 1797), ("faces", 100)])
def test_builtin_sources_load_offline_at_the_configured_size(name: str, count: int) -> None:
    table = load_builtin(name, image_size=16, channels=1)
    assert len(table) == count
    assert table.images.shape == (count, 1, 16, 16)
    image, label, row = table[3]
    assert image.min() >= -1 and image.max() <= 1 and image.dtype == torch.float32
    assert int(row) == 3
    if name == "digits":
        assert set(table.labels.tolist()) == set(range(10))
    rgb = load_builtin(name, image_size=8, channels=3)
    assert rgb.images.shape[1:] == (3, 8, 8)


def test_modes_convert_to_the_configured_channels() -> None:
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))  # fully transparent: goes onto white
    palette = Image.new("P", (6, 6))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 6, 6))
    assert to_uint8_image(rgba, 4, 3).tolist() == np.full((3, 4, 4), 255).tolist()
    assert to_uint8_image(palette, 4, 3)[:, 0, 0].tolist() == [200, 100, 50]
    assert to_uint8_image(palette, 4, 1).shape == (1, 4, 4)
    assert to_uint8_image(np.ones((5, 5)), 5, 1).max() == 255  # float images in [0, 1]


def test_folder_with_classes_and_mixed_modes(tmp_path) -> None:
    arrays = _random_images(6)
    modes = ["RGB", "L", "RGBA", "P", "RGB", "L"]
    for i, (array, mode) in enumerate(zip(arrays, modes)):
        folder = tmp_path / ("cat" if i % 2 else "dog")
        folder.mkdir(exist_ok=True)
        Image.fromarray(array).convert(mode).save(folder / f"{i}.png")
    table = load_folder(tmp_path, image_size=8, channels=3)
    assert table.images.shape == (6, 3, 8, 8)
    assert sorted(table.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert all(i.startswith("folder/") for i in table.ids)


def test_folder_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="holds no image"):
        load_folder(tmp_path, 8, 1)
    Image.fromarray(_random_images(1)[0]).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png.*on_bad_file: skip"):
        load_folder(tmp_path, 8, 1)
    assert len(load_folder(tmp_path, 8, 1, on_bad_file="skip")) == 1


@pytest.fixture()
def hf_dataset():
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(a) for a in _random_images(12, seed=1)]
    return datasets.Dataset.from_dict(
        {"img": images, "fine_label": list(range(12))},
        features=datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64")}),
    )


def test_hf_dataset_from_disk_and_parquet(tmp_path, hf_dataset) -> None:
    hf_dataset.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    hf_dataset.to_parquet(str(tmp_path / "pq" / "part0.parquet"))
    for path in (tmp_path / "disk", tmp_path / "pq", tmp_path / "pq" / "part0.parquet"):
        table = load_hf(str(path), 8, 3, image_column="img", label_column="fine_label")
        assert table.images.shape == (12, 3, 8, 8)
        assert table.labels.tolist() == list(range(12))
    unlabeled = load_hf(str(tmp_path / "disk"), 8, 1, image_column="img", label_column=None, max_images=5)
    assert unlabeled.labels.tolist() == [-1] * 5


def test_hf_errors_name_the_column_and_the_offline_fix(tmp_path, hf_dataset) -> None:
    hf_dataset.save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(ValueError, match="no image column 'image'.*img"):
        load_hf(str(tmp_path / "disk"), 8, 3, label_column="fine_label")
    with pytest.raises(ValueError, match="no label column 'label'"):
        load_hf(str(tmp_path / "disk"), 8, 3, image_column="img")
    with pytest.raises(ValueError, match="cannot reach the Hugging Face Hub.*save_to_disk"):
        load_hf("privdiff-test/no-such-dataset-offline", 8, 3)


def _table(n: int = 200) -> ImageTable:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    return ImageTable(images, torch.arange(n) % 10, [f"t/{i}" for i in range(n)])


def test_split_is_seeded_disjoint_and_plants_duplicates() -> None:
    pool = _table()
    a = membership_split(pool, 50, 40, seed=3, duplicate_images=4, duplicate_copies=5)
    b = membership_split(pool, 50, 40, seed=3, duplicate_images=4, duplicate_copies=5)
    c = membership_split(pool, 50, 40, seed=4)
    assert a.members.ids == b.members.ids and a.heldout.ids == b.heldout.ids and a.planted == b.planted
    assert a.members.ids != c.members.ids
    assert not set(a.members.ids) & set(a.heldout.ids)
    assert len(a.train) == 50 + 4 * 4
    for image_id, copies in a.planted.items():
        assert sum(t.split("#")[0] == image_id for t in a.train.ids) == copies
        rows = [i for i, t in enumerate(a.train.ids) if t.split("#")[0] == image_id]
        assert all(torch.equal(a.train.images[r], a.train.images[rows[0]]) for r in rows)


def test_heldout_skips_near_copies_of_members() -> None:
    pool = _table(60)
    # Make every odd image a copy of the image before it: a held-out copy of a member must be skipped.
    pool.images[1::2] = pool.images[0::2]
    split = membership_split(pool, 20, 10, seed=0, heldout_min_l2=0.01)
    members = {bytes(x.numpy()) for x in split.members.images}
    assert not any(bytes(x.numpy()) in members for x in split.heldout.images)


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="fewer than num_members"):
        membership_split(_table(20), 15, 10, seed=0)
    with pytest.raises(ValueError, match="duplicate_images"):
        membership_split(_table(20), 5, 5, seed=0, duplicate_images=6, duplicate_copies=2)


def test_datamodule_writes_the_same_manifest_for_the_same_seed(tmp_path) -> None:
    dm = DiffusionDataModule(num_members=32, num_heldout=16, duplicate_images=2, duplicate_copies=3, run_dir=str(tmp_path / "a"))
    dm.setup("fit")
    dm2 = DiffusionDataModule(num_members=32, num_heldout=16, duplicate_images=2, duplicate_copies=3, run_dir=str(tmp_path / "b"))
    dm2.setup("fit")
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert first == second
    manifest = Manifest.load(tmp_path / "a" / "manifest.json")
    assert len(manifest.train) == 32 + 2 * 2 and manifest.num_classes == 10
    images, labels, rows = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (1, 16, 16) and len(images) == len(labels) == len(rows)
    # Same run directory, other seed: refuse rather than silently change the membership.
    other = DiffusionDataModule(num_members=32, num_heldout=16, seed=1, run_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no longer match the manifest"):
        other.setup("fit")


def test_datamodule_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="needs data.path"):
        DiffusionDataModule(source="folder")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        DiffusionDataModule(channels=2)


def test_a_string_label_column_becomes_class_indices_and_a_bad_one_is_named(tmp_path) -> None:
    import datasets

    images = [np.full((8, 8), 40 * i, dtype=np.uint8) for i in range(6)]
    names = ["dog", "cat", "cat", "owl", "dog", "cat"]
    datasets.Dataset.from_dict({"image": images, "kind": names, "score": [0.5] * 6}).save_to_disk(str(tmp_path / "ds"))
    table = load_hf(str(tmp_path / "ds"), 8, 1, label_column="kind")
    assert table.labels.tolist() == [1, 0, 0, 2, 1, 0]  # sorted names: cat, dog, owl
    with pytest.raises(ValueError, match=r"label column 'score' .* integers or class names .*float 0.5.*data.label_column"):
        load_hf(str(tmp_path / "ds"), 8, 1, label_column="score")


def _digit_folder(folder, rows, copies=()):
    from sklearn.datasets import load_digits

    digits = (load_digits().images / 16 * 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in rows:
        Image.fromarray(digits[i]).save(folder / f"d{i:04d}.png")
    for i in copies:  # the same picture under another name, as in real photo folders
        Image.fromarray(digits[i]).save(folder / f"copy_of_{i:04d}.png")


def test_all_members_with_copies_in_the_pool_keeps_every_copy_in_training_and_groups_them(tmp_path) -> None:
    _digit_folder(tmp_path / "pool", range(80), copies=range(10))
    dm = DiffusionDataModule(source="folder", path=str(tmp_path / "pool"), image_size=8, num_members=None, num_heldout=20,
                             run_dir=str(tmp_path / "run"))
    dm.setup()
    m = dm.manifest
    assert len(m.members) + len(m.heldout) == 90  # nothing silently left out
    assert not any("copy_of" in i for i in m.heldout)  # a copy never sits among the non-members
    groups = {frozenset(g) for g in m.groups}
    assert {frozenset({f"folder/d{i:04d}.png", f"folder/copy_of_{i:04d}.png"}) for i in range(10)} <= groups
    index = m.group_index(dm.members)
    row = {i: r for r, i in enumerate(dm.members.ids)}
    assert index[row["folder/copy_of_0003.png"]] == index[row["folder/d0003.png"]]


def test_a_second_source_gives_the_non_members(tmp_path) -> None:
    from privdiff.eval.audit import load_audit_data

    _digit_folder(tmp_path / "train", range(60))
    _digit_folder(tmp_path / "test", range(60, 100), copies=[5])  # one test image is a copy of a training image
    dm = DiffusionDataModule(source="folder", path=str(tmp_path / "train"), image_size=8, num_members=None, num_heldout=None,
                             heldout={"source": "folder", "path": str(tmp_path / "test")}, run_dir=str(tmp_path / "run"))
    dm.setup()
    m = Manifest.load(tmp_path / "run" / "manifest.json")
    assert len(m.members) == 60 and len(m.heldout) == 40 and all(i.startswith("heldout:") for i in m.heldout)
    assert [e["id"] for e in m.excluded] == ["heldout:folder/copy_of_0005.png"]  # too close to a member: said, not used
    data = load_audit_data(m)  # an audit of the saved run finds both sources again
    assert data.heldout.ids == m.heldout and torch.equal(data.heldout.images, dm.heldout.images)
    with pytest.raises(ValueError, match="num_heldout: null .* needs data.heldout"):
        DiffusionDataModule(num_heldout=None)
