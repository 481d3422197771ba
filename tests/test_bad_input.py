"""Bad input gets an error that names the problem and the fix (the cases tests/train/test_data.py,
tests/test_configs.py and tests/eval/test_audit.py do not already cover)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.defenses.dedup import DedupDefense
from privdiff.eval.audit import load_audit_data
from privdiff.cli import PrivdiffCLI, run_fit_cli
from privdiff.train.data import DiffusionDataModule, Manifest, load_folder
from privdiff.train.module import DiffusionModule

REPO = Path(__file__).resolve().parents[1]


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _noise(seed: int, shape=(12, 12, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# -- corrupt, truncated, oversized files --------------------------------------------------------------
def test_truncated_jpeg_and_png_fail_by_name_or_are_skipped_with_a_count(tmp_path, capsys) -> None:
    for i in range(3):
        Image.fromarray(_noise(i)).save(tmp_path / f"good{i}.png")
    for name, fmt in (("cut.jpg", "JPEG"), ("cut.png", "PNG")):
        data = _encoded(_noise(9, (32, 32, 3)), fmt)
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?i)cannot read image .*cut.jpg.*truncated.*on_bad_file: skip"):
        load_folder(tmp_path, 8, 1)
    table = load_folder(tmp_path, 8, 1, on_bad_file="skip")
    assert len(table) == 3 and all("good" in i for i in table.ids)
    assert "skipped 3 unreadable image file(s)" in capsys.readouterr().out


def test_a_decompression_bomb_is_a_bad_file_too(tmp_path, monkeypatch) -> None:
    Image.fromarray(_noise(0)).save(tmp_path / "small.png")
    Image.fromarray(_noise(1, (64, 64, 3))).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL refuses it as a bomb
    with pytest.raises(ValueError, match=r"cannot read image .*huge.png.*on_bad_file: skip"):
        load_folder(tmp_path, 8, 1)
    assert load_folder(tmp_path, 8, 1, on_bad_file="skip").ids == ["folder/small.png"]


def test_mixed_sizes_modes_and_bit_depths_all_become_the_configured_images(tmp_path) -> None:
    gray = np.full((9, 20), 128, dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "a_wide_L.png")
    Image.fromarray(_noise(0, (40, 31, 3))).save(tmp_path / "b_tall_RGB.jpg")
    Image.fromarray(_noise(1, (5, 5, 4))).convert("RGBA").save(tmp_path / "c_tiny_RGBA.png")
    Image.fromarray(_noise(2, (16, 16, 3))).convert("P").save(tmp_path / "d_P.gif")
    Image.fromarray(_noise(3, (16, 16, 3))).convert("CMYK").save(tmp_path / "e_CMYK.jpg")
    Image.fromarray(_noise(4, (16, 16))).convert("1").save(tmp_path / "f_bilevel.png")
    # 16-bit and float images at mid-grey: PIL's own convert("L") would clip them to white or black.
    Image.fromarray(np.full((16, 16), 128 * 257, dtype=np.uint16)).save(tmp_path / "g_16bit.png")
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "h_float.tif")
    for channels in (1, 3):
        table = load_folder(tmp_path, 8, channels)
        assert table.images.shape == (8, channels, 8, 8)
        rows = {image_id.split("/")[-1]: row for row, image_id in enumerate(table.ids)}
        for name in ("a_wide_L.png", "g_16bit.png", "h_float.tif"):
            values = table.images[rows[name]].unique().tolist()
            assert all(126 <= v <= 128 for v in values), (name, values)


# -- data the defenses or the audit cannot use ----------------------------------------------------------
def test_all_duplicate_data_names_the_held_out_problem_and_dedup_keeps_one_of_each(tmp_path) -> None:
    for i in range(6):
        Image.fromarray(_noise(0)).save(tmp_path / f"same{i}.png")
    with pytest.raises(ValueError, match=r"only 0 images remain for num_heldout=2 after skipping near-copies.*lower num_heldout"):
        DiffusionDataModule(source="folder", path=str(tmp_path), image_size=8, num_members=4, num_heldout=2).setup()
    dm = DiffusionDataModule(source="folder", path=str(tmp_path), image_size=8, num_members=6, num_heldout=0, defenses=[DedupDefense()])
    dm.setup()
    assert len(dm.train_set) == 1 and len(dm.manifest.removed) == 5
    assert {r["kept"] for r in dm.manifest.removed} == {dm.train_set.ids[0]} and all(r["exact"] for r in dm.manifest.removed)


def test_a_held_out_set_too_small_for_mia_fails_before_training(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/audit/fast.yaml",
            "--run_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
            "--data.num_members", "16", "--data.duplicate_images", "0", "--model.diffusion.block_out_channels", "[16, 32]"]
    with pytest.raises(ValueError, match=r"at least 2 held-out images, got data.num_heldout=1; raise data.num_heldout"):
        run_fit_cli([*args, "--data.num_heldout", "1"])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()  # no step was taken
    with pytest.raises(ValueError, match=r"at least 2 examples, got audit.attacks.mia.examples=1"):
        run_fit_cli([*args, "--run_dir", str(tmp_path / "b"), "--data.num_heldout", "8", "--audit.attacks.mia.examples", "1"])
    assert not (tmp_path / "b" / "checkpoints").exists()


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "yaml_text,key",
    [
        ("data:\n  batchsize: 8\n", "batchsize"),
        ("data:\n  defenses:\n    - class_path: privdiff.defenses.dp_sgd.DPSGDDefense\n"
         "      init_args: {noise_multipler: 1.0}\n", "noise_multipler"),
        ("audit:\n  num_sample: 8\n", "num_sample"),
    ],
    ids=["data", "defense", "audit"],
)
def test_an_unknown_config_key_is_named(yaml_text: str, key: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(SystemExit):
        PrivdiffCLI(DiffusionModule, DiffusionDataModule, args=["-c", "configs/base.yaml", "-c", str(bad)], run=False)
    assert key in capsys.readouterr().err


# -- a manifest that does not match the data --------------------------------------------------------------
def _folder(root: Path, n: int = 12) -> Path:
    root.mkdir()
    for i in range(n):
        Image.fromarray(_noise(i)).save(root / f"{i:02d}.png")
    return root


def test_a_manifest_naming_images_the_source_lacks_is_refused(tmp_path) -> None:
    data = _folder(tmp_path / "images")
    dm = DiffusionDataModule(source="folder", path=str(data), image_size=8, num_members=6, num_heldout=4, run_dir=str(tmp_path / "run"))
    dm.setup()
    manifest = Manifest.load(tmp_path / "run" / "manifest.json")
    assert len(load_audit_data(manifest).members) == 6
    (data / manifest.heldout[0].split("/", 1)[1]).unlink()
    with pytest.raises(ValueError, match=r"names 1 image\(s\) the data source does not have.*does not match the data"):
        load_audit_data(manifest)


def test_images_edited_behind_the_manifests_ids_are_refused_on_resume_and_audit(tmp_path) -> None:
    data = _folder(tmp_path / "images")
    settings = dict(source="folder", path=str(data), image_size=8, num_members=6, num_heldout=4, run_dir=str(tmp_path / "run"))
    DiffusionDataModule(**settings).setup()
    manifest = Manifest.load(tmp_path / "run" / "manifest.json")
    assert len(manifest.fingerprint) == 64
    member_file = data / manifest.members[0].split("/", 1)[1]
    Image.fromarray(255 - np.asarray(Image.open(member_file))).save(member_file)  # same name, other pixels
    with pytest.raises(ValueError, match=r"images behind the manifest's ids .* changed since it was written.*new run directory"):
        DiffusionDataModule(**settings).setup()
    with pytest.raises(ValueError, match="changed since it was written"):
        load_audit_data(manifest)
    # A manifest written before fingerprints existed is still accepted (ids only).
    old = json.loads((tmp_path / "run" / "manifest.json").read_text())
    old.pop("fingerprint")
    assert len(load_audit_data(Manifest(**old)).members) == 6


def test_a_caption_screen_longer_than_the_sampler_is_refused_before_training() -> None:
    from privdiff.eval.audit import AuditConfig
    from privdiff.eval.caption_scores import first_timesteps
    from privdiff.eval.detection import MemorizationDetection
    from privdiff.eval.prompt_extraction import PromptExtraction

    short = AuditConfig(steps=4, attacks={"prompt_extraction": PromptExtraction(screen_first_steps=10)})
    with pytest.raises(ValueError, match="screen_first_steps below 4"):
        short.check(64, 64)
    AuditConfig(steps=4, attacks={"prompt_extraction": PromptExtraction(screen_first_steps=3)}).check(64, 64)
    AuditConfig(steps=4, attacks={"prompt_extraction": PromptExtraction(screen="none")}).check(64, 64)
    with pytest.raises(ValueError, match="first_steps < steps"):
        MemorizationDetection(first_steps=10, steps=10)
    with pytest.raises(ValueError, match="first_steps < steps"):
        first_timesteps(1000, 4, 11)


def test_the_command_line_leaves_attacks_out_by_name_and_names_the_ones_it_cannot_find(monkeypatch, capsys) -> None:
    """``--audit.attacks.NAME null`` does not parse (jsonargparse); ``--audit.skip`` is the command line's way."""
    monkeypatch.chdir(REPO)
    base = ["-c", "configs/base.yaml", "-c", "configs/data/digits.yaml"]
    cli = PrivdiffCLI(DiffusionModule, DiffusionDataModule, args=[*base, "--audit.skip", "[mia, memorization]"], run=False)
    audit = cli.config_init["audit"]
    assert [name for name, _ in audit.plugins()] == ["quality", "extraction"]
    assert "mia" not in audit.to_dict()["attacks"]
    with pytest.raises((SystemExit, ValueError)) as refused:  # which one depends on jsonargparse's stage
        PrivdiffCLI(DiffusionModule, DiffusionDataModule, args=[*base, "--audit.skip", "[mai]"], run=False)
    assert "audit skip names ['mai']" in str(refused.value) + capsys.readouterr().err


def test_an_attacks_dict_that_leaves_nothing_to_run_is_refused(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    bad = tmp_path / "nomia.yaml"
    bad.write_text("audit:\n  attacks:\n    mia: null\n")  # replaces the default dict: no attack left
    with pytest.raises((SystemExit, ValueError)) as refused:
        PrivdiffCLI(DiffusionModule, DiffusionDataModule, args=["-c", "configs/base.yaml", "-c", str(bad)], run=False)
    assert "audit.attacks leaves no attack to run" in str(refused.value) + capsys.readouterr().err
