"""DedupDefense: planted near-duplicates go, distinct digits stay, every removal names its twin."""

from __future__ import annotations

import io
import json
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.defenses.dedup import DedupDefense, near_duplicate_pairs
from privdiff.duplicates import HASH_METHODS
from privdiff.train.data import ImageTable, Manifest, load_builtin

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits() -> ImageTable:
    return load_builtin("digits", 16, 1)


def empty_manifest() -> Manifest:
    return Manifest(seed=0, source={}, image_shape=[1, 16, 16], num_classes=10, members=[], heldout=[])


def resize(a: np.ndarray, size: int, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    return np.array(Image.fromarray(a).resize((size, size), resample))


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def near_copies(a: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Copies of one 16x16 grayscale image as a scraper would meet them."""
    side = a.shape[0]
    return {
        "down12up": resize(resize(a, 12), side),
        "up32down": resize(resize(a, 32), side, Image.Resampling.LANCZOS),
        "noise4": np.clip(a + rng.normal(0, 4, a.shape), 0, 255).round().astype(np.uint8),
        "jpeg90": jpeg(a, 90),
        "jpeg75": jpeg(a, 75),
    }


def with_planted(pool: ImageTable, sources: list[int], seed: int = 0) -> tuple[ImageTable, dict[str, str]]:
    """Append near-copies of ``sources``; returns the table and {copy id: source id}."""
    rng = np.random.default_rng(seed)
    images, ids, twin = [], [], {}
    for row in sources:
        for kind, copy in near_copies(pool.images[row, 0].numpy(), rng).items():
            assert not np.array_equal(copy, pool.images[row, 0].numpy()), kind  # a near, not an exact, copy
            images.append(torch.from_numpy(copy)[None])
            ids.append(f"{pool.ids[row]}#{kind}")
            twin[ids[-1]] = pool.ids[row]
    extra = ImageTable(torch.stack(images), pool.labels[sources].repeat_interleave(5), ids)
    return ImageTable.concat([pool, extra]), twin


def exact_duplicate_extras(table: ImageTable) -> set[str]:
    """Ids of byte-identical repeats (all but the first of each group) in ``table``."""
    seen: dict[bytes, str] = {}
    extras = set()
    for i, image in enumerate(table.images.numpy()):
        key = image.tobytes()
        if key in seen:
            extras.add(table.ids[i])
        else:
            seen[key] = table.ids[i]
    return extras


def test_planted_near_duplicates_go_and_every_distinct_digit_stays(digits: ImageTable) -> None:
    sources = np.random.default_rng(1).choice(len(digits), 12, replace=False).tolist()
    table, twin = with_planted(digits, sources)
    # The digits may hold genuine byte-identical images; the defense must remove exactly those too.
    genuine = exact_duplicate_extras(digits)
    manifest = empty_manifest()
    defense = DedupDefense()
    out = defense.transform_dataset(table, manifest)
    removed = {r["id"]: r for r in manifest.removed}
    assert set(removed) == set(twin) | genuine  # every planted copy, and no distinct digit
    assert set(out.ids) == set(digits.ids) - genuine
    for copy_id, source_id in twin.items():
        record = removed[copy_id]
        assert record["kept"] == source_id and record["defense"] == "dedup"
        assert 0 <= record["distance"] <= 64 and 0 < record["l2"] <= 0.045 and record["exact"] is False
    assert defense.metrics()["images_removed"] == len(twin) + len(genuine)
    assert defense.metrics()["clusters"] == len(sources) + len({r["kept"] for r in removed.values() if r["id"] in genuine})
    assert out.images.shape[1:] == digits.images.shape[1:] and len(out) == len(out.labels)


def test_hash_alone_at_imagededup_default_would_remove_distinct_digits(digits: ImageTable) -> None:
    """Why the default has an l2 gate: the hash alone at threshold 10 merges distinct 16x16 digits."""
    manifest = empty_manifest()
    DedupDefense(max_distance_threshold=10, max_l2=None).transform_dataset(digits, manifest)
    assert len(manifest.removed) > 1000


@pytest.mark.parametrize("method", HASH_METHODS)
def test_exact_duplicates_always_removed_even_at_threshold_zero(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (12, 1, 16, 16), generator=gen, dtype=torch.uint8)
    images = torch.cat([base, base[[3, 7, 3]]])
    table = ImageTable(images, torch.zeros(15, dtype=torch.long), [f"x/{i}" for i in range(15)])
    manifest = empty_manifest()
    out = DedupDefense(method=method, max_distance_threshold=0, max_l2=0.0).transform_dataset(table, manifest)
    assert out.ids == [f"x/{i}" for i in range(12)]
    assert [(r["id"], r["kept"], r["distance"], r["exact"]) for r in manifest.removed] == [
        ("x/12", "x/3", 0, True),
        ("x/13", "x/7", 0, True),
        ("x/14", "x/3", 0, True),
    ]


def test_exact_duplicates_removed_even_when_the_near_duplicate_search_finds_nothing(monkeypatch) -> None:
    import privdiff.duplicates as dedup

    monkeypatch.setattr(dedup, "_search", lambda *args, **kwargs: [])
    base = torch.arange(4 * 64, dtype=torch.uint8).reshape(4, 1, 8, 8)
    table = ImageTable(torch.cat([base, base[[1]]]), torch.zeros(5, dtype=torch.long), list("abcde"))
    manifest = empty_manifest()
    assert DedupDefense().transform_dataset(table, manifest).ids == list("abcd")
    assert [(r["id"], r["kept"], r["exact"]) for r in manifest.removed] == [("e", "b", True)]


def test_same_input_same_removals(digits: ImageTable) -> None:
    table, _ = with_planted(digits.select(range(300)), [4, 50, 120], seed=3)
    runs = []
    for _ in range(2):
        manifest = empty_manifest()
        out = DedupDefense().transform_dataset(table, manifest)
        runs.append((out.ids, json.dumps(manifest.removed)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_distance_threshold": 65}, "got 65"),
        ({"max_distance_threshold": -1}, "got -1"),
        ({"max_distance_threshold": 2.5}, "got 2.5"),
        ({"method": "md5"}, "got 'md5'"),
        ({"max_l2": -0.1}, "got -0.1"),
        ({"method": "cnn", "min_similarity": 1.5}, "got 1.5"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DedupDefense(**kwargs)
    with pytest.raises(ValueError, match=message):
        near_duplicate_pairs(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), **{
            {"max_distance_threshold": "threshold"}.get(k, k): v for k, v in kwargs.items()
        })


def test_pairs_match_imagededup_find_duplicates(digits: ImageTable) -> None:
    """The blocked numpy search returns exactly imagededup's brute-force pairs and distances."""
    from imagededup.methods import PHash

    hasher = PHash(verbose=False)
    encoding = {str(i): hasher.encode_image(image_array=a) for i, a in enumerate(digits.images[:, 0].numpy())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = hasher.find_duplicates(encoding_map=encoding, max_distance_threshold=4, scores=True, num_dist_workers=1)
    theirs = {(int(q), int(k), int(d)) for q, hits in found.items() for k, d in hits if int(q) < int(k)}
    ours = set(near_duplicate_pairs(digits.images, "phash", 4, max_l2=None))
    assert ours == theirs and len(ours) == 84


def test_reference_mode_finds_heldout_copies_of_members(digits: ImageTable) -> None:
    members, heldout = digits.images[:100], digits.images[100:200].clone()
    heldout[17, 0] = torch.from_numpy(jpeg(members[5, 0].numpy(), 90))
    heldout[42] = members[60]
    pairs = near_duplicate_pairs(heldout, reference=members)
    assert [(i, j) for i, j, _ in pairs] == [(17, 5), (42, 60)]
    assert pairs[1][2] == 0


def test_describe_and_metrics() -> None:
    d = DedupDefense(max_distance_threshold=4)
    assert d.describe() == "dedup(phash≤4,l2≤0.045)"
    assert DedupDefense(max_l2=None).describe() == "dedup(phash≤8)"
    assert set(d.metrics()) >= {"images_removed", "clusters", "method", "threshold"}


def test_cnn_offline_error_names_the_weights(monkeypatch, tmp_path) -> None:
    """No weights in the cache and no network: a RuntimeError that says which file goes where."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, whatever this machine holds

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    defense = DedupDefense(method="cnn")  # selectable: configs load without the weights
    table = ImageTable(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), ["a", "b"])
    with pytest.raises(RuntimeError, match="could not be downloaded") as err:
        defense.transform_dataset(table, empty_manifest())
    assert "mobilenet_v3_small-047dcff4.pth" in str(err.value) and "cnn_weights: PATH" in str(err.value)


class UntrainedMobilenet(torch.nn.Module):
    """imagededup's MobilenetV3 encoder without the ImageNet weights (same layers, random init)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_small

        torch.manual_seed(0)
        net = mobilenet_v3_small(weights=None).eval()
        self.body = torch.nn.Sequential(net.features, net.avgpool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


def test_cnn_path_runs_offline_with_a_stand_in_encoder(monkeypatch, digits: ImageTable) -> None:
    """The CNN search and the records work (features of an untrained encoder: only exact copies are asserted)."""
    import privdiff.duplicates as dedup

    monkeypatch.setattr(dedup, "load_cnn_encoder", lambda weights=None: UntrainedMobilenet().eval())
    base = digits.select(range(0, 80, 10))
    table = ImageTable.concat([base, base.select([2, 7])])
    table.ids[-2:] = ["copy-a", "copy-b"]
    manifest = empty_manifest()
    defense = DedupDefense(method="cnn", min_similarity=0.99, max_l2=0.0)
    out = defense.transform_dataset(table, manifest)
    assert out.ids == base.ids
    assert [(r["id"], r["kept"], r["exact"]) for r in manifest.removed] == [("copy-a", base.ids[2], True), ("copy-b", base.ids[7], True)]
    assert all(isinstance(r["distance"], float) and abs(r["distance"]) < 1e-5 for r in manifest.removed)
    assert defense.metrics()["threshold"] == 0.99 and defense.describe() == "dedup(cnn≥0.99,l2≤0)"
    pairs = near_duplicate_pairs(table.images, "cnn", min_similarity=0.99, max_l2=0.0)
    assert [(i, j) for i, j, _ in pairs] == [(2, 8), (7, 9)]


def test_cnn_removes_exact_copies_when_weights_are_present() -> None:
    from torchvision.models import MobileNet_V3_Small_Weights

    name = MobileNet_V3_Small_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    if not (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file():
        pytest.skip(f"torchvision weights {name} not in the torch hub cache (offline machine)")
    base = load_builtin("digits", 16, 1).select(range(20))
    table = ImageTable.concat([base, base.select([2])])
    table.ids[-1] = "copy"
    manifest = empty_manifest()
    out = DedupDefense(method="cnn", max_l2=0.045).transform_dataset(table, manifest)
    assert out.ids == base.ids and manifest.removed[0]["kept"] == base.ids[2]


def test_cli_fit_with_dedup_config_removes_the_planted_copies(tmp_path, monkeypatch) -> None:
    from privdiff.cli import run_fit_cli

    monkeypatch.chdir(REPO)
    cli = run_fit_cli(
        ["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/defense/dedup.yaml",
         "--run_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
         "--audit", "null"]
    )
    manifest = Manifest.load(tmp_path / "manifest.json")
    assert len(manifest.planted_duplicates) == 4 and set(manifest.planted_duplicates.values()) == {10}
    expected = {f"{base}#copy{c}": base for base in manifest.planted_duplicates for c in range(1, 10)}
    assert {r["id"]: r["kept"] for r in manifest.removed} == expected
    assert all(r["exact"] and r["distance"] == 0 for r in manifest.removed)
    assert manifest.train == manifest.members and not any("#copy" in i for i in manifest.train)
    assert cli.datamodule.defenses.metrics()["defense/dedup/images_removed"] == 36


class _Planted:
    """A pickle that runs code when unpickled (writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_file_planted_in_the_torch_hub_cache_never_runs(monkeypatch, tmp_path) -> None:
    import pickle

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (cache / "mobilenet_v3_small-047dcff4.pth").write_bytes(pickle.dumps({"weights": _Planted(marker)}))
    table = ImageTable(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="SHA-256 starts .* not 047dcff4.*Nothing was loaded.*cnn_weights: PATH"):
        DedupDefense(method="cnn").transform_dataset(table, empty_manifest())
    assert not marker.exists()


def test_cnn_weights_given_by_path_are_hash_checked_and_loaded_weights_only(monkeypatch, tmp_path, digits: ImageTable) -> None:
    import hashlib
    import pickle

    import privdiff.duplicates as dedup
    from privdiff.weights import load_checked_weights
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    good = tmp_path / "weights.pth"
    torch.save(mobilenet_v3_small(weights=None).state_dict(), good)
    prefix = hashlib.sha256(good.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(dedup, "CNN_WEIGHTS_URL", f"https://example.invalid/mobilenet_v3_small-{prefix}.pth")
    base = digits.select(range(0, 60, 10))
    table = ImageTable.concat([base, base.select([3])])
    table.ids[-1] = "copy"
    manifest = empty_manifest()
    out = DedupDefense(method="cnn", cnn_weights=str(good), max_l2=0.0).transform_dataset(table, manifest)
    assert out.ids == base.ids and manifest.removed[0]["kept"] == base.ids[3]
    # A file with the expected hash that holds code is still refused: it is unpickled weights-only.
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pth"
    bad.write_bytes(pickle.dumps({"w": _Planted(marker)}))
    url = f"https://example.invalid/x-{hashlib.sha256(bad.read_bytes()).hexdigest()[:8]}.pth"
    with pytest.raises(ValueError, match="refused to load"):
        load_checked_weights(bad, url, "test weights")
    assert not marker.exists()


def test_removing_most_of_the_data_is_reported(digits: ImageTable) -> None:
    table = ImageTable.concat([digits.select([0] * 30), digits.select(range(1, 5))])
    table.ids = [f"row{i}" for i in range(len(table))]
    with pytest.warns(UserWarning, match=r"dedup removed 29 of 34 training rows \(85%; 29 of them byte-identical"):
        DedupDefense().transform_dataset(table, empty_manifest())
