"""Sample quality: FID and KID with torchmetrics, always reported with the name of their feature extractor.

Two backbones:

- ``"inception"``: torchmetrics' default, torch-fidelity's InceptionV3 (2048-d pool features, the standard FID
  of Heusel et al. 2017 / KID of Binkowski et al. 2018). Its weights download once from GitHub; offline they
  must be placed by hand (see ``load_feature_extractor``). Meaningful for natural RGB images; small grayscale
  images are upsampled to 299x299 and replicated to 3 channels.
- ``"classifier"``: the penultimate features of a ``SmallClassifier`` trained on the data's own labels
  (``train_feature_classifier``). Numbers are comparable only between runs that use the same classifier, so
  cache it with ``save_classifier``. A random, untrained network gives meaningless, tiny distances.

All images handed to this module are float tensors (N, C, H, W) in [0, 1]; convert model outputs in [-1, 1]
with ``(x + 1) / 2``. torchmetrics hands images unchanged to a custom feature module (its ``normalize`` flag
only converts images for its built-in Inception), so both extractors here take those [0, 1] floats and do
their own conversion; each carries an integer ``num_features`` so torchmetrics does not probe it with a
3x299x299 image.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from privdiff.files import write_safetensors_atomic
from privdiff.weights import cached_or_downloaded, load_checked_weights, privdiff_cache

from ..train.preparation import CachedFit, ClassifierFit, run_preparation
from .plugin import AuditContext, AuditPlugin, AuditResult, Column, Privacy
from .sample_stream import SampleReduction, concat

FEATURE_SUBSET = 4096  # samples whose features KID and recall read (their subsets and balls need the features themselves)

BACKBONES: tuple[str, ...] = ("inception", "classifier")
_METADATA_KEY = "privdiff.small_classifier"


@dataclass(frozen=True)
class QualityResult:
    """FID and KID (mean and std over subsets) of ``fake`` against ``real`` in the features of ``backbone``
    (``"inception-v3"`` or ``"small-classifier-<F>d"``)."""

    fid: float
    kid_mean: float
    kid_std: float
    backbone: str
    num_real: int
    num_fake: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


# -- the classifier backbone --------------------------------------------------------------------------


class SmallClassifier(nn.Module):
    """A small CNN classifier for images in [0, 1] of shape ``image_shape`` = (C, H, W); GroupNorm, no BatchNorm.

    ``features(x)`` returns the penultimate activations, shape (B, ``feature_dim``), used as the FID space.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, width: int = 16, feature_dim: int = 64,
        label_source: str = "labels",
    ) -> None:
        super().__init__()
        self.label_source = str(label_source)
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if width < 8 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8 (GroupNorm groups), got {width}")
        self.image_shape, self.num_classes = image_shape, int(num_classes)
        self.width, self.feature_dim = int(width), int(feature_dim)
        c, w = image_shape[0], self.width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(c, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 2), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.embed = nn.Sequential(nn.Linear(8 * w, self.feature_dim), nn.SiLU())
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    @property
    def config(self) -> dict[str, object]:
        return {
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
            "label_source": self.label_source,
        }

    def features(self, x: Tensor) -> Tensor:
        """Return the penultimate features (B, feature_dim) of images in [0, 1]."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"this classifier takes images of shape {self.image_shape}, got {tuple(x.shape[1:])}")
        return self.embed(self.body(x * 2 - 1))

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits (B, num_classes)."""
        return self.head(self.features(x))


def _check_images(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a tensor of shape (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() and (x.min() < -1e-4 or x.max() > 1 + 1e-4):
        raise ValueError(
            f"{name} must be in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]"
            " (model outputs in [-1, 1] convert with (x + 1) / 2)"
        )


def train_feature_classifier(
    images: Tensor,
    labels: Tensor | None,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    feature_dim: int = 64,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    label_source: str = "labels",
) -> SmallClassifier:
    """Train a ``SmallClassifier`` on ``images`` (N, C, H, W) in [0, 1] with int64 ``labels``; return it in eval mode.

    Adam with cross-entropy (:class:`privdiff.train.preparation.ClassifierFit`, a Lightning stage), seeded: the
    initialisation and the shuffling depend on ``seed`` only, and the global random state is left untouched.
    """
    if labels is None:
        raise ValueError(
            "FID with the `classifier` backbone needs labels to train its feature classifier; "
            "use `backbone: inception` or a labeled dataset"
        )
    _check_images("images", images)
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers (int64), got dtype {labels.dtype}")
    labels = labels.long()
    if labels.min() < 0:
        raise ValueError("labels must be >= 0")
    n_cls = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(labels.max()) >= n_cls:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes={n_cls}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = SmallClassifier(tuple(images.shape[1:]), n_cls, width=width, feature_dim=feature_dim, label_source=label_source).to(device)
    batches = ClassifierFit.batches(images, labels, epochs, batch_size, torch.Generator(device="cpu").manual_seed(seed))
    run_preparation(ClassifierFit(clf, lr), batches, progress=progress)
    return clf.eval()


def classes_for_features(images: Tensor, labels: Tensor | None, seed: int = 0, clusters: int = 10) -> tuple[Tensor, str]:
    """The classes a feature classifier learns: the data's labels, or k-means clusters for unlabeled data.

    Labels count when every image has one (>= 0) and there are at least 2 classes. Otherwise the
    images (pixels in [0, 1]) are clustered by scikit-learn's k-means (``clusters`` clusters, at
    most N // 5, seeded), and the classifier learns the clusters: its features then separate what
    k-means separates, a weaker FID space than real labels, named ``kmeans<k>`` in the backbone.
    Returns (int64 classes, ``"labels"`` or ``"kmeans<k>"``).
    """
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if len(labels) == len(images) and bool((labels >= 0).all()) and len(torch.unique(labels)) >= 2:
            return labels, "labels"
    from sklearn.cluster import KMeans

    k = max(2, min(clusters, len(images) // 5))
    if len(images) < 2 * k:
        raise ValueError(f"FID's feature classifier needs labels or at least {2 * k} images to cluster, got {len(images)}")
    flat = images.reshape(len(images), -1).double().numpy()
    assigned = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(flat)
    return torch.as_tensor(assigned, dtype=torch.long), f"kmeans{k}"


def save_classifier(clf: SmallClassifier, path: str | Path, extra: dict | None = None) -> None:
    """Write the classifier's weights to a safetensors file; its constructor arguments (and ``extra``) go in the metadata."""
    write_safetensors_atomic(path, clf.state_dict(), _classifier_metadata(clf, extra))


def _classifier_metadata(clf: SmallClassifier, extra: dict | None) -> dict[str, str]:
    return {"format": "pt", _METADATA_KEY: json.dumps(clf.config), "privdiff.extra": json.dumps(extra or {})}


def _classifier_from(state: dict[str, Tensor], meta: dict[str, str], path: Path) -> SmallClassifier:
    if _METADATA_KEY not in meta:
        raise ValueError(f"{path} holds no privdiff SmallClassifier (metadata key {_METADATA_KEY!r} missing)")
    cfg = json.loads(meta[_METADATA_KEY])
    clf = SmallClassifier(tuple(cfg["image_shape"]), cfg["num_classes"], cfg["width"], cfg["feature_dim"], cfg.get("label_source", "labels"))
    clf.load_state_dict(state)
    return clf.eval()


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> SmallClassifier:
    """Load a classifier written by ``save_classifier`` (weights only; returned in eval mode)."""
    path = Path(path)
    kept = CachedFit(path).load()
    if kept is None:
        raise FileNotFoundError(f"no classifier file at {path}")
    return _classifier_from(*kept, path).to(device)


# -- feature extractors for torchmetrics --------------------------------------------------------------


class ClassifierFeatures(nn.Module):
    """Feature module for torchmetrics FID/KID: float images in [0, 1] -> (B, F) ``SmallClassifier`` features."""

    def __init__(self, classifier: SmallClassifier) -> None:
        super().__init__()
        if not isinstance(classifier, SmallClassifier):
            raise TypeError(f"expected a SmallClassifier, got {type(classifier).__name__}")
        self.classifier = classifier
        self.num_features: int = classifier.feature_dim  # spares torchmetrics its 3x299x299 probe
        # Safe inside a logger metric name; says when the classes were k-means clusters, not labels.
        suffix = "" if classifier.label_source == "labels" else f"-{classifier.label_source}"
        self.name = f"small-classifier-{classifier.feature_dim}d{suffix}"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.classifier.features(x.float())


class InceptionFeatures(nn.Module):
    """Feature module for torchmetrics FID/KID: float images in [0, 1] (1 or 3 channels) -> torch-fidelity
    InceptionV3 2048-d features, converted to uint8 exactly as torchmetrics does with ``normalize=True``.

    The weights come from ``weights_path`` or the torch hub cache (downloaded there when missing);
    either way the file's SHA-256 is checked and it is read weights-only (``privdiff.weights``).
    """

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        import tempfile

        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = Path(weights_path) if weights_path is not None else cached_or_downloaded(URL_INCEPTION_V3, INCEPTION, _inception_help())
        state = load_checked_weights(path, URL_INCEPTION_V3, INCEPTION)
        # torch-fidelity reads a weight file with torch.load(weights_only=False): hand it a copy of
        # the checked tensors written here, so nothing it unpickles comes from outside.
        with tempfile.TemporaryDirectory() as tmp:
            checked = Path(tmp) / "inception.pth"
            torch.save(state, checked)
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(checked)
            )
        self.num_features: int = 2048
        self.name = "inception-v3"  # torch-fidelity's TF-ported InceptionV3, 2048-d pool3 features

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"the inception backbone takes 1- or 3-channel images, got {x.shape[1]} channels")
        if x.dtype != torch.uint8:
            x = (x.clamp(0, 1) * 255).byte()  # torchmetrics' own conversion (truncation)
        return self.inception(x)


INCEPTION = "FID's InceptionV3 (torch-fidelity weights)"


def _inception_help() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return (
        f"On a machine with internet, download {URL_INCEPTION_V3}, bring the file here and set audit.attacks.quality.weights: PATH "
        "(privdiff checks its SHA-256 and loads it weights-only); or use the classifier backbone: audit.attacks.quality.backbone: classifier (offline)"
    )


def load_feature_extractor(
    backbone: str, classifier: SmallClassifier | None = None, weights_path: str | Path | None = None
) -> nn.Module:
    """Return the feature module for ``backbone``: a module with ``num_features``, ``name`` and [0, 1] inputs.

    ``"inception"``: torch-fidelity's InceptionV3 (torchmetrics' default), from ``weights_path`` or the torch hub
    cache, downloading it if needed; raises RuntimeError with instructions when that fails.
    ``"classifier"``: the given trained ``SmallClassifier``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if backbone == "classifier":
        if classifier is None:
            raise ValueError(
                "backbone 'classifier' needs a trained SmallClassifier (train_feature_classifier or load_classifier)"
            )
        return ClassifierFeatures(classifier)
    try:
        return InceptionFeatures(weights_path)
    except (OSError, ValueError, RuntimeError) as err:
        raise RuntimeError(f"could not load the InceptionV3 weights for FID/KID: {err}. {_inception_help()}") from err


# -- FID and KID --------------------------------------------------------------------------------------


def compute_quality(
    real: Tensor,
    fake: Tensor,
    backbone: str = "classifier",
    classifier: SmallClassifier | None = None,
    batch_size: int = 256,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    weights_path: str | Path | None = None,
    feature_extractor: nn.Module | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> QualityResult:
    """Return FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) of ``fake`` against ``real``.

    Images: float (N, C, H, W) in [0, 1]. The KID subset size is clamped to the smaller of the two sample
    counts (torchmetrics refuses a subset larger than the sample), and its random subsets are drawn under
    ``seed`` so the result is reproducible. ``feature_extractor`` (from ``load_feature_extractor``) overrides
    ``backbone``/``classifier``/``weights_path`` to reuse a loaded Inception. FID in a d-dimensional feature
    space is biased upwards for small N; compare numbers only at equal N and backbone.
    """
    _check_images("real", real)
    _check_images("fake", fake)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real and fake images differ in shape: {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID/KID need at least 2 real and 2 fake images, got {real.shape[0]} and {fake.shape[0]}")
    if batch_size < 1 or kid_subset_size < 2 or kid_subsets < 1:
        raise ValueError("batch_size and kid_subsets must be >= 1 and kid_subset_size >= 2")
    extractor = feature_extractor or load_feature_extractor(backbone, classifier, weights_path)
    if not isinstance(getattr(extractor, "num_features", None), int):
        raise ValueError("the feature extractor needs an integer `num_features` attribute")
    device = device or _device(extractor)
    subset = min(int(kid_subset_size), real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        fid = FrechetInceptionDistance(feature=extractor, reset_real_features=True).to(device)
        kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=subset).to(device)
    for images, is_real in ((real, True), (fake, False)):
        name = "real" if is_real else "fake"
        for i in tqdm(range(0, images.shape[0], batch_size), desc=f"features ({name})", disable=not progress):
            x = images[i : i + batch_size].to(device, torch.float32)
            fid.update(x, real=is_real)
            kid.update(x, real=is_real)
    fid_value = float(fid.compute())
    kid_mean, kid_std = _seeded(kid, seed)
    return QualityResult(
        fid=fid_value,
        kid_mean=float(kid_mean),
        kid_std=float(kid_std),
        backbone=getattr(extractor, "name", type(extractor).__name__),
        num_real=int(real.shape[0]),
        num_fake=int(fake.shape[0]),
    )


# -- cached classifiers, precision and recall, sanity references ---------------------------------------


def _device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (the CPU for one without parameters)."""
    params = list(module.parameters())
    return params[0].device if params else torch.device("cpu")


def _seeded(kid: KernelInceptionDistance, seed: int) -> tuple[Tensor, Tensor]:
    """KID's mean and std over random subsets drawn under ``seed`` (reproducible, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return kid.compute()


def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """The extractor's features (N, F) of images in [0, 1]."""
    device = _device(extractor)
    with torch.no_grad():
        out = [extractor(images[i : i + batch_size].to(device, torch.float32)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, extractor.num_features)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, NeurIPS) of ``fake`` against ``real`` features.

    Each feature set is a union of balls: around every point, the distance to its k-th nearest
    neighbour in its own set. Precision is the share of fake points inside some real ball (fidelity),
    recall the share of real points inside some fake ball (coverage). Written here because
    torchmetrics has no such metric; blocked, so no full N x M matrix is held.
    """
    real, fake = real.double(), fake.double()
    return covered(fake, real, ball_radii(real, k, block), block).float().mean().item(), \
        covered(real, fake, ball_radii(fake, k, block), block).float().mean().item()


def ball_radii(x: Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """(N,) each point's distance to its k-th nearest neighbour in its own set (itself excluded)."""
    kk = min(k + 1, len(x))
    return torch.cat([torch.cdist(x[i : i + block], x).topk(kk, largest=False).values[:, -1] for i in range(0, len(x), block)])


def covered(points: Tensor, centres: Tensor, radii: Tensor, block: int = 1024) -> Tensor:
    """(N,) bool: which points lie inside some centre's ball."""
    inside = [(torch.cdist(points[i : i + block], centres) <= radii[None]).any(1) for i in range(0, len(points), block)]
    return torch.cat(inside) if inside else torch.zeros(0, dtype=torch.bool)


def _cache_dir() -> Path:
    return privdiff_cache("feature_classifiers")


def cached_feature_classifier(
    images: Tensor, labels: Tensor | None, seed: int = 0, cache_dir: str | Path | None = None, test_share: float = 0.2,
) -> tuple[SmallClassifier, dict]:
    """The offline FID classifier for these images, trained once and cached by their content; and its record.

    The classes are the labels or k-means clusters (:func:`classes_for_features`). It trains on a
    seeded ``1 - test_share`` of the images and its accuracy on the rest is reported: a classifier
    that does not learn the data gives a meaningless feature space. The cache (safetensors, keyed by
    a hash of the pixels, the classes and the settings) lives in ``$XDG_CACHE_HOME/privdiff``.
    """
    classes, source = classes_for_features(images, labels, seed=seed)
    settings = repr((tuple(images.shape), seed, test_share, source, SmallClassifier.__init__.__defaults__))
    cache = CachedFit.keyed(Path(cache_dir) if cache_dir is not None else _cache_dir(),
                            images.mul(255).round().byte(), classes, settings)
    kept = cache.load()
    if kept is not None:
        record = json.loads(kept[1].get("privdiff.extra", "{}"))
        return _classifier_from(*kept, cache.path), {**record, "cached": True, "cache": str(cache.path)}
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(round(len(images) * (1 - test_share))))
    train, test = order[:cut], order[cut:]
    clf = train_feature_classifier(images[train], classes[train], seed=seed, label_source=source,
                                   num_classes=int(classes.max()) + 1)
    with torch.no_grad():
        accuracy = float((clf(images[test]).argmax(1) == classes[test]).float().mean()) if len(test) else float("nan")
    record = {"classes": source, "num_classes": int(classes.max()) + 1, "num_train": len(train), "num_test": len(test),
              "test_accuracy": accuracy, "chance_accuracy": float(torch.bincount(classes).max()) / len(classes)}
    cache.save(clf.state_dict(), _classifier_metadata(clf, record))
    return clf, {**record, "cached": False, "cache": str(cache.path)}


# -- the audit plugin ---------------------------------------------------------------------------------


@dataclass
class QualityReport(AuditResult):
    """FID and KID of the samples against real images, in the named feature space, with precision,
    recall, the classifier's held-out accuracy and the sanity references (real vs real, noise)."""

    result: QualityResult
    extra: dict

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), **self.extra}

    def columns(self) -> list[Column]:
        r = self.result
        cols = [
            Column("fid", "FID", "Fréchet distance in the named backbone's feature space (lower is better)", r.fid,
                   f"{r.fid:.3g} ({r.backbone})", Privacy.UTILITY),
            Column("kid", "KID", "kernel inception distance, mean ± std over subsets", r.kid_mean, f"{r.kid_mean:.3g} ± {r.kid_std:.2g}"),
        ]
        if "precision" in self.extra:
            cols.append(Column("precision_recall", "precision / recall", "Kynkaanniemi et al. 2019, k=3, in the same features",
                               self.extra["precision"], f"{self.extra['precision']:.2f} / {self.extra['recall']:.2f}"))
        return cols

    def verdict(self) -> str | None:
        text = f"utility: FID {self.result.fid:.3g} ({self.result.backbone})"
        if "precision" in self.extra:
            text += f", precision {self.extra['precision']:.2f} / recall {self.extra['recall']:.2f}"
        return text

    def scalars(self) -> dict[str, float]:
        out = {f"fid_{self.result.backbone}": float(self.result.fid)}
        if "precision" in self.extra:
            out.update(precision=float(self.extra["precision"]), recall=float(self.extra["recall"]))
        return out

    def notes(self) -> list[str]:
        notes = []
        clf = self.extra.get("classifier")
        if clf:
            notes.append(
                f"FID features: a small classifier trained on the data's {clf['classes']} ({clf['num_classes']} classes); "
                f"held-out accuracy {clf['test_accuracy']:.0%} (chance {clf['chance_accuracy']:.0%})."
            )
        ref = self.extra.get("reference")
        if ref:
            notes.append(
                f"FID references in the same features: real vs real {ref['fid_real_vs_real']:.3g}, uniform noise "
                f"{ref['fid_noise']:.3g}" + ("" if ref["ok"] else " — the feature space does not tell noise from data: FID is not meaningful here")
                + "."
            )
        return notes


class _Features(nn.Module):
    """Features given as input (KID of features already extracted)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


@dataclass
class _FeatureStats(SampleReduction):
    """What quality keeps of each shard: the samples' feature sums (FID's mean and covariance, summed as torchmetrics
    sums them, batch by batch in float64), how many lie in some real image's ball (precision), and the features of
    the first ``subset`` samples (KID's subsets and recall's balls)."""

    extractor: nn.Module
    real_features: Tensor
    real_radii: Tensor
    subset: int = FEATURE_SUBSET
    batch_size: int = 256

    def update(self, images: Tensor, labels: Tensor | None, first: int) -> dict[str, Tensor]:
        f = extract_features(self.extractor, images, self.batch_size)
        width = self.extractor.num_features
        total, outer = torch.zeros(width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64)
        for i in range(0, len(f), self.batch_size):
            part = f[i : i + self.batch_size].double()
            total += part.sum(0)
            outer += part.t().mm(part)
        inside = covered(f.double(), self.real_features.double(), self.real_radii)
        return {"sum": total, "outer": outer, "count": torch.tensor([len(f)]), "inside": inside.sum().reshape(1),
                "subset": f[: max(0, self.subset - first)]}

    def merge(self, shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {"sum": sum(s["sum"] for s in shards), "outer": sum(s["outer"] for s in shards),
                "count": concat(shards, "count").sum(), "inside": concat(shards, "inside").sum(),
                "subset": concat(shards, "subset")}


class SampleQuality(AuditPlugin):
    """FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and precision/recall (Kynkaanniemi et al. 2019) of the samples.

    Args:
        backbone: ``classifier`` (a small CNN trained on the data's labels, or on k-means clusters of
            unlabeled data, cached per data set; offline) or ``inception`` (torch-fidelity's InceptionV3).
        real: the real images: ``pool`` (every image of the source), ``members``, or ``heldout`` (the held-out images
            only: a figure that reads no member, e.g. for choosing a DP-SGD checkpoint without spending privacy).
        weights: the InceptionV3 weight file for ``inception`` (default: the torch hub cache's,
            downloaded when missing; hash-checked and loaded weights-only).
        cache_dir: where trained feature classifiers are kept (default ``$XDG_CACHE_HOME/privdiff``).
    """

    name = "quality"

    def __init__(self, backbone: Literal["classifier", "inception"] = "classifier", real: Literal["pool", "members", "heldout"] = "pool",
                 weights: str | None = None, cache_dir: str | None = None) -> None:
        if backbone not in BACKBONES:
            raise ValueError(f"quality backbone must be one of {BACKBONES}, got {backbone!r}")
        if real not in ("pool", "members", "heldout"):
            raise ValueError(f"quality real must be 'pool', 'members' or 'heldout', got {real!r}")
        self.backbone, self.real, self.weights, self.cache_dir = backbone, real, weights, cache_dir

    def check(self, num_members: int, num_heldout: int) -> None:
        if self.backbone == "inception":
            load_feature_extractor("inception", weights_path=self.weights)  # its weights: now, not after training

    def _real(self, context: AuditContext) -> tuple[Tensor, Tensor | None, dict]:
        """The real images, their labels, and what the report says of them."""
        data = context.data
        if self.real == "heldout":
            table = data.heldout
        else:
            table = data.pool if (self.real == "pool" and data.pool is not None) else data.members
        return table.unit(), table.labels, {"real": self.real}

    def _extractor(self, context: AuditContext) -> tuple[nn.Module, Tensor, dict]:
        """The feature extractor (training or loading the classifier once per audit), the real images, what to report."""
        def load() -> tuple[nn.Module, Tensor, dict]:
            real, labels, extra = self._real(context)
            classifier = None
            if self.backbone == "classifier":
                classifier, extra["classifier"] = cached_feature_classifier(real, labels, seed=context.seed, cache_dir=self.cache_dir)
            return load_feature_extractor(self.backbone, classifier, self.weights), real, extra

        return context.memoized(("quality features", self.backbone, self.real, self.weights, self.cache_dir), load)

    def reduction(self, context: AuditContext) -> SampleReduction | None:
        extractor, real, _ = self._extractor(context)
        real_f = context.memoized(("quality real features", self.backbone, self.real), lambda: extract_features(extractor, real))
        return _FeatureStats(extractor, real_f, ball_radii(real_f.double()))

    def run(self, context: AuditContext) -> QualityReport | None:
        if context.num_samples < 2:
            return None
        stats = self.reduced(context)
        extractor, real, extra = self._extractor(context)
        extra = dict(extra)
        real_f = context.memoized(("quality real features", self.backbone, self.real), lambda: extract_features(extractor, real))
        result = _fid_kid(real_f, stats, context.seed, getattr(extractor, "name", type(extractor).__name__))
        extra["precision"] = float(stats["inside"]) / int(stats["count"])
        extra["recall"] = covered(real_f.double(), stats["subset"].double(), ball_radii(stats["subset"].double())).float().mean().item()
        if len(stats["subset"]) < int(stats["count"]):
            extra["feature_subset"] = len(stats["subset"])  # KID and recall read the first samples' features only
        half = torch.randperm(len(real), generator=torch.Generator().manual_seed(context.seed))
        a, b = real[half[: len(real) // 2]], real[half[len(real) // 2 :]]
        noise = torch.rand((min(len(real), 512), *real.shape[1:]), generator=torch.Generator().manual_seed(context.seed))
        fid_rr = compute_quality(a, b, feature_extractor=extractor, kid_subsets=10, seed=context.seed).fid
        fid_noise = compute_quality(real, noise, feature_extractor=extractor, kid_subsets=10, seed=context.seed).fid
        extra["reference"] = {"fid_real_vs_real": fid_rr, "fid_noise": fid_noise, "ok": fid_noise > 5 * max(fid_rr, 1e-6)}
        return QualityReport(result, extra)


def _fid_kid(real_f: Tensor, stats: dict[str, Tensor], seed: int, backbone: str, kid_subset_size: int = 1000,
             kid_subsets: int = 100, batch_size: int = 256) -> QualityResult:
    """FID from the samples' streamed feature sums and KID from their feature subset, each against the real images'
    features, computed by torchmetrics as :func:`compute_quality` computes them from images (the real features fed in
    the same batches, so the sums are the same)."""
    fake_f, count = stats["subset"], int(stats["count"])
    features = _Features(real_f.shape[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        fid = FrechetInceptionDistance(feature=features, reset_real_features=True)
        kid = KernelInceptionDistance(feature=features, subsets=kid_subsets,
                                      subset_size=min(kid_subset_size, len(real_f), len(fake_f)))
    for i in range(0, len(real_f), batch_size):
        fid.update(real_f[i : i + batch_size], real=True)
    fid.fake_features_sum = stats["sum"]
    fid.fake_features_cov_sum = stats["outer"]
    fid.fake_features_num_samples = torch.tensor(count)
    kid.update(real_f, real=True)
    kid.update(fake_f, real=False)
    kid_mean, kid_std = _seeded(kid, seed)
    return QualityResult(fid=float(fid.compute()), kid_mean=float(kid_mean), kid_std=float(kid_std), backbone=backbone,
                         num_real=len(real_f), num_fake=count)
