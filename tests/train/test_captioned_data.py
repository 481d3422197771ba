"""Captioned data for text-to-image models: the built-in set, a Hugging Face dataset, an imagefolder with
metadata.jsonl, the manifest's captions, dedup on images, caption randomization, and the errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.defenses.caption_randomization import CaptionRandomization
from privdiff.defenses.dedup import DedupDefense
from privdiff.membership import Manifest
from privdiff.model import Batch
from privdiff.train.data import DiffusionDataModule, load_builtin, load_folder, load_hf


def _images(n: int, size: int = 12, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_builtin_captioned_digits_have_a_caption_each_that_names_the_digit() -> None:
    table = load_builtin("captioned_digits", 16, 1)
    assert len(table) == 1797 and len(set(table.captions)) == 1797
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert all(f" {names[int(label)]}," in caption for caption, label in zip(table.captions, table.labels))


def test_the_datamodule_plants_duplicated_pairs_and_the_manifest_records_captions(tmp_path: Path) -> None:
    dm = DiffusionDataModule(source="captioned_digits", image_size=8, num_members=20, num_heldout=10, duplicate_images=2,
                             duplicate_copies=4, batch_size=8, run_dir=str(tmp_path))
    dm.setup()
    train = dm.train_set
    assert len(train) == 20 + 2 * 3
    by_caption: dict[str, list[int]] = {}
    for row, caption in enumerate(train.captions):
        by_caption.setdefault(caption, []).append(row)
    planted = [rows for rows in by_caption.values() if len(rows) > 1]
    assert sorted(len(r) for r in planted) == [4, 4]  # each planted copy keeps its image's caption
    for rows in planted:
        assert all(torch.equal(train.images[rows[0]], train.images[r]) for r in rows)
    manifest = Manifest.load(tmp_path / "manifest.json")
    assert set(manifest.captions) == set(manifest.members)
    assert all(manifest.captions[i] == c for i, c in zip(dm.members.ids, dm.members.captions))
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)  # what Lightning calls
    assert isinstance(batch, Batch) and isinstance(batch.cond, list)
    assert batch.cond == [train.captions[int(r)] for r in batch.rows]  # each image with its own caption

    hashed = DiffusionDataModule(source="captioned_digits", image_size=8, num_members=20, num_heldout=10, batch_size=8,
                                 caption_privacy="hash", run_dir=str(tmp_path / "hashed"))
    hashed.setup()
    text = (tmp_path / "hashed" / "manifest.json").read_text()
    stored = json.loads(text)["captions"]
    assert all(v.startswith("sha256:") for v in stored.values())
    assert not any(c in text for c in hashed.members.captions)  # the captions stay out of the run directory


def test_a_captioned_hugging_face_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    captions = [f"photo number {i} of a red kite" for i in range(10)]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in _images(10)], "prompt": captions},
                                    features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    table = load_hf(str(tmp_path / "ds"), 8, 3, label_column=None, caption_column="prompt")
    assert table.captions == captions and table.images.shape == (10, 3, 8, 8)
    with pytest.raises(ValueError, match=r"no caption column 'text'.*\['image', 'prompt'\].*data.caption_column"):
        load_hf(str(tmp_path / "ds"), 8, 3, label_column=None, caption_column="text")
    bad = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in _images(3)], "text": ["a kite", "  ", "a cat"]},
                                     features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"1 image\(s\) .* empty or missing caption .*000001"):
        load_hf(str(tmp_path / "bad"), 8, 3, label_column=None, caption_column="text")


def _imagefolder(root: Path, n: int, lines: list[dict] | None = None) -> Path:
    root.mkdir(parents=True)
    for i, a in enumerate(_images(n, seed=2)):
        Image.fromarray(a).save(root / f"img{i}.png")
    lines = lines if lines is not None else [{"file_name": f"img{i}.png", "text": f"a noisy square number {i}"} for i in range(n)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def test_an_imagefolder_with_metadata_jsonl(tmp_path: Path) -> None:
    folder = _imagefolder(tmp_path / "ok", 6)
    table = load_folder(folder, 8, 3, caption_column="text")
    assert table.captions == [f"a noisy square number {i}" for i in range(6)]
    missing_file = _imagefolder(tmp_path / "missing", 2, [{"file_name": "img0.png", "text": "a"}, {"file_name": "gone.png", "text": "b"}])
    with pytest.raises(ValueError, match=r"metadata.jsonl:2 names 'gone.png', which is not a file"):
        load_folder(missing_file, 8, 3, caption_column="text")
    no_line = _imagefolder(tmp_path / "noline", 2, [{"file_name": "img0.png", "text": "a"}])
    with pytest.raises(ValueError, match=r"1 image\(s\) .* no line in metadata.jsonl .*img1.png"):
        load_folder(no_line, 8, 3, caption_column="text")
    wrong_key = _imagefolder(tmp_path / "key", 1, [{"file_name": "img0.png", "caption": "a"}])
    with pytest.raises(ValueError, match=r"metadata.jsonl:1 needs 'file_name' and 'text' \(data.caption_column\)"):
        load_folder(wrong_key, 8, 3, caption_column="text")
    empty = _imagefolder(tmp_path / "empty", 1, [{"file_name": "img0.png", "text": ""}])
    with pytest.raises(ValueError, match="empty or missing caption"):
        load_folder(empty, 8, 3, caption_column="text")
    with pytest.raises(ValueError, match="needs .*metadata.jsonl"):
        (tmp_path / "plain").mkdir()
        Image.fromarray(_images(1)[0]).save(tmp_path / "plain" / "a.png")
        load_folder(tmp_path / "plain", 8, 3, caption_column="text")


def test_bad_captions_fail_before_training_through_the_cli(tmp_path: Path, monkeypatch) -> None:
    from privdiff.cli import run_fit_cli

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    folder = _imagefolder(tmp_path / "data", 12, [{"file_name": f"img{i}.png", "text": "x" if i != 5 else " "} for i in range(12)])
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/model/t2i_tiny.yaml", "--data.source", "folder", "--data.path", str(folder),
            "--data.caption_column", "text", "--data.image_size", "8", "--data.num_members", "6", "--data.num_heldout", "4",
            "--data.duplicate_images", "0", "--run_dir", str(tmp_path / "run"), "--trainer.max_steps", "2", "--audit", "null"]
    with pytest.raises(ValueError, match="empty or missing caption"):
        run_fit_cli(args)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dedup_merges_duplicate_images_never_different_images_with_the_same_caption(tmp_path: Path) -> None:
    images = _images(6, seed=4)
    lines = []
    root = tmp_path / "f"
    root.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(root / f"img{i}.png")
        lines.append({"file_name": f"img{i}.png", "text": "a photo of my product"})  # one caption for different images
    Image.fromarray(images[0]).save(root / "copy0.png")
    lines.append({"file_name": "copy0.png", "text": "another caption, same image"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    d = DedupDefense(method="phash", max_distance_threshold=8, max_l2=0.045)
    dm = DiffusionDataModule(source="folder", path=str(root), caption_column="text", image_size=12, channels=3, num_members=7,
                             num_heldout=0, duplicate_images=0, batch_size=4, defenses=[d], run_dir=str(tmp_path / "run"))
    dm.setup()
    assert len(dm.train_set) == 6  # the byte-identical copy went, the six images sharing a caption stayed
    removed = {r["id"] for r in json.loads((tmp_path / "run" / "manifest.json").read_text())["removed"]}
    assert removed in ({"folder/copy0.png"}, {"folder/img0.png"})


def test_caption_randomization_edits_captions_with_the_training_vocabulary_and_fresh_randomness() -> None:
    captions = ["a bold handwritten seven leaning right", "a thin handwritten two upright", "a plain handwritten nine upright"]
    table = load_builtin("digits", 8, 1).select(range(3))
    table.captions = captions
    defenses = [CaptionRandomization(probability=1.0, replace_words=1, insert_words=1, embedding_noise=0.2) for _ in range(2)]
    batch = Batch(table.unit(), captions * 20, torch.arange(60))
    outs = []
    for d in defenses:
        d.transform_dataset(table, None)  # type: ignore[arg-type]  # it records nothing
        out = d.transform_batch(batch)
        vocabulary = set(d.vocabulary)
        assert all(len(new.split()) == len(old.split()) + 1 for new, old in zip(out.cond, batch.cond))
        assert all(set(new.split()) <= vocabulary for new in out.cond)
        assert sum(new != old for new, old in zip(out.cond, batch.cond)) > 40
        assert out.cond_noise == 0.2 and torch.equal(out.images, batch.images) and torch.equal(out.rows, batch.rows)
        outs.append(out.cond)
    assert outs[0] != outs[1]  # seeded from the OS: two runs of the same config randomize differently
    assert defenses[0].metrics()["captions_randomized"] == 60
    with pytest.raises(ValueError, match="captioned training data"):
        CaptionRandomization().transform_dataset(load_builtin("digits", 8, 1).select(range(3)), None)  # type: ignore[arg-type]  # it records nothing


def test_embedding_noise_reaches_the_text_model() -> None:
    from privdiff.train.latent import LatentTextToImage

    torch.manual_seed(0)
    model = LatentTextToImage(image_size=8, channels=1, vae_block_out_channels=(8, 16), block_out_channels=(8, 16), attention_head_dim=4,
                              text_width=16, text_layers=1, vae_steps=0, caption_dropout=0.0)
    x, t, noise = torch.rand(2, 1, 8, 8), torch.tensor([100, 200]), torch.randn(2, 4, 4, 4)
    plain = model.per_example_loss(Batch(x, ["a", "b"], torch.arange(2)), t, noise)
    again = model.per_example_loss(Batch(x, ["a", "b"], torch.arange(2)), t, noise)
    noisy = model.per_example_loss(Batch(x, ["a", "b"], torch.arange(2), cond_noise=1.0), t, noise)
    torch.testing.assert_close(plain, again)
    assert not torch.allclose(plain, noisy)


def test_poisson_batches_of_captioned_data_keep_captions_and_may_be_empty(tmp_path: Path) -> None:
    """Opacus builds an empty Poisson batch from the structure of the first one (tensors only): captions are
    looked up by row after the loader, so DP-SGD on captioned data survives empty batches."""
    from privdiff.defenses.dp_sgd import DPSGDDefense

    d = DPSGDDefense(noise_multiplier=1.0, accountant="rdp")
    dm = DiffusionDataModule(source="captioned_digits", image_size=8, num_members=16, num_heldout=4, duplicate_images=0,
                             batch_size=1, defenses=[d], run_dir=str(tmp_path))
    dm.setup()
    loader = d.wrap_train_loader(dm.train_dataloader())
    sizes = []
    for _ in range(3):  # q = 1/16: about a third of the batches are empty, some after a full one
        for loaded in loader:
            batch = Batch.of(dm.on_before_batch_transfer(loaded, 0))
            sizes.append(len(batch))
            assert batch.cond == [dm.train_set.captions[int(r)] for r in batch.rows]
    assert any(a > 0 and b == 0 for a, b in zip(sizes, sizes[1:]))  # an empty batch after a full one (P(none) ~ 1e-5)


def test_the_built_in_faces_and_photos_come_captioned_too_each_image_its_own_caption() -> None:
    from privdiff.train.data import load_builtin

    for name, count in (("captioned_faces", 100), ("captioned_photos", 552)):
        table = load_builtin(name, 16, 1)
        plain = load_builtin(name.removeprefix("captioned_"), 16, 1)
        assert len(table) == count and len(set(table.captions)) == count and torch.equal(table.images, plain.images)
        assert all(i.startswith(f"{name}/") for i in table.ids) and plain.captions is None
    assert load_builtin("captioned_photos", 16, 3).captions[0].startswith("a mid-toned photo of part of the astronaut picture")
