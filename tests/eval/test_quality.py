"""FID/KID: the classifier backbone on scikit-learn digits (self-FID ~ 0, monotone in added noise, trained vs
random features), determinism, the safetensors round trip, validation, and the offline Inception error."""

import urllib.error
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from privdiff.eval.quality import (
    ClassifierFeatures,
    QualityResult,
    SmallClassifier,
    compute_quality,
    load_classifier,
    load_feature_extractor,
    save_classifier,
    train_feature_classifier,
)




@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, torch.tensor(d.target)


@pytest.fixture(scope="module")
def classifier(digits):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_feature_classifier(*digits, seed=0)
    finally:
        torch.set_num_threads(n)


def noisy(x, sigma, seed=1):
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def test_classifier_learns_the_digits(digits, classifier):
    x, y = digits
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).float().mean()
        feats = ClassifierFeatures(classifier)(x[:5])
    assert acc > 0.95
    assert feats.shape == (5, classifier.feature_dim) == (5, ClassifierFeatures(classifier).num_features)


def test_fid_is_zero_on_itself_and_rises_with_noise(digits, classifier):
    x, _ = digits
    results = [compute_quality(x, noisy(x, s), classifier=classifier, kid_subset_size=500, kid_subsets=10)
               for s in (0.0, 0.1, 0.3)]
    assert all(isinstance(r, QualityResult) for r in results)
    fids = [r.fid for r in results]
    assert abs(fids[0]) < 1e-4
    assert fids[0] < fids[1] < fids[2] and fids[1] > 1e-2
    kids = [r.kid_mean for r in results]
    assert kids[0] < kids[1] < kids[2]
    r = results[2]
    assert r.backbone == f"small-classifier-{classifier.feature_dim}d" and (r.num_real, r.num_fake) == (len(x), len(x))
    assert set(r.to_dict()) == {"fid", "kid_mean", "kid_std", "backbone", "num_real", "num_fake"}


def test_trained_features_see_what_random_features_miss(digits, classifier):
    x, _ = digits
    fake = noisy(x, 0.3)
    trained = compute_quality(x, fake, classifier=classifier, kid_subset_size=200, kid_subsets=5).fid
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_net = SmallClassifier((1, 8, 8), 10).eval()
    untrained = compute_quality(x, fake, classifier=random_net, kid_subset_size=200, kid_subsets=5).fid
    assert trained > 10 * untrained


def test_kid_subset_is_clamped_and_seeded(digits, classifier):
    x, _ = digits
    real, fake = x[:40], noisy(x[40:70], 0.2)
    a = compute_quality(real, fake, classifier=classifier, kid_subset_size=1000, kid_subsets=20, seed=3)
    b = compute_quality(real, fake, classifier=classifier, kid_subset_size=1000, kid_subsets=20, seed=3)
    assert a == b and torch.isfinite(torch.tensor([a.fid, a.kid_mean, a.kid_std])).all()
    assert (a.num_real, a.num_fake) == (40, 30)


def test_training_is_seeded_and_deterministic(digits):
    x, y = digits[0][:300], digits[1][:300]
    a = train_feature_classifier(x, y, epochs=2, seed=5)
    b = train_feature_classifier(x, y, epochs=2, seed=5)
    c = train_feature_classifier(x, y, epochs=2, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_and_load_round_trip(tmp_path, digits, classifier):
    path = tmp_path / "clf.safetensors"
    save_classifier(classifier, path)
    loaded = load_classifier(path)
    assert loaded.config == classifier.config and not loaded.training
    x = digits[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), classifier.features(x))


def test_validation(digits, classifier):
    x, y = digits
    with pytest.raises(ValueError, match="needs labels.*backbone: inception"):
        train_feature_classifier(x[:10], None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_quality(x * 2 - 1, x, classifier=classifier)
    with pytest.raises(ValueError, match="needs a trained SmallClassifier"):
        compute_quality(x, x, backbone="classifier")
    with pytest.raises(ValueError, match="backbone must be one of"):
        load_feature_extractor("vgg")
    with pytest.raises(ValueError, match="shape"):
        compute_quality(x, torch.rand(10, 1, 16, 16), classifier=classifier)


def test_inception_offline_raises_a_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        load_feature_extractor("inception")
    msg = str(info.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "audit.attacks.quality.weights: PATH" in msg
    assert "backbone: classifier" in msg and "URLError" in msg


def test_a_file_planted_as_the_inception_weights_never_runs(monkeypatch, tmp_path):
    import pickle

    class Planted:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned", "code ran"))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for target in (cache / "weights-inception-2015-12-05-6726825d.pth", tmp_path / "given.pth"):
        target.write_bytes(pickle.dumps({"w": Planted()}))
    with pytest.raises(RuntimeError, match="SHA-256 starts .* not 6726825d"):
        load_feature_extractor("inception")
    with pytest.raises(RuntimeError, match="SHA-256 starts .* not 6726825d"):
        load_feature_extractor("inception", weights_path=tmp_path / "given.pth")
    assert not (tmp_path / "pwned").exists()


def test_inception_missing_weights_file_raises_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not load the InceptionV3 weights"):
        load_feature_extractor("inception", weights_path=tmp_path / "missing.pth")


def test_the_feature_classifier_is_trained_once_per_data_set_and_reports_its_accuracy(tmp_path, digits):
    from privdiff.eval.quality import cached_feature_classifier

    x, y = digits
    first, record = cached_feature_classifier(x, y, seed=0, cache_dir=tmp_path)
    assert not record["cached"] and record["test_accuracy"] > 0.8 > record["chance_accuracy"]
    again, record2 = cached_feature_classifier(x, y, seed=0, cache_dir=tmp_path)
    assert record2["cached"] and record2["test_accuracy"] == record["test_accuracy"]
    with torch.no_grad():
        torch.testing.assert_close(again.features(x[:8]), first.features(x[:8]))
    _, other = cached_feature_classifier(x[:500], y[:500], seed=0, cache_dir=tmp_path)
    assert not other["cached"]  # other pixels, another classifier
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_precision_and_recall_separate_fidelity_from_coverage():
    from privdiff.eval.quality import precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    assert precision_recall(real, real + 1e-3) == (1.0, 1.0)
    far = torch.randn(300, 8, generator=g) + 20
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:5].repeat(60, 1)  # every sample is one of five real points: faithful, not diverse
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.2


def test_fid_against_the_heldout_images_reads_no_member(tmp_path, digits):
    """``real: heldout``: the real images are the held-out ones; members of other digits do not move the figure."""
    from privdiff.eval.plugin import AuditContext, AuditData
    from privdiff.eval.quality import SampleQuality
    from privdiff.membership import ImageTable

    x, y = digits
    low, high = (y < 5).nonzero().squeeze(1)[:300], (y >= 5).nonzero().squeeze(1)[:300]
    table = lambda rows: ImageTable((x[rows] * 255).round().to(torch.uint8), y[rows], [f"d{int(i)}" for i in rows])  # noqa: E731
    members, heldout = table(low), table(high)
    context = AuditContext(model=None, data=AuditData(members, heldout, torch.ones(len(members), dtype=torch.long)),
                           samples=x[(y >= 5).nonzero().squeeze(1)[300:500]])
    on_heldout = SampleQuality(real="heldout", cache_dir=str(tmp_path)).run(context)
    on_members = SampleQuality(real="members", cache_dir=str(tmp_path)).run(context)
    assert on_heldout.to_dict()["real"] == "heldout"
    assert on_heldout.to_dict()["fid"] * 5 < on_members.to_dict()["fid"]  # samples of 5-9 are close to held-out 5-9 only
