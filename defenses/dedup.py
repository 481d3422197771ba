"""Training-set deduplication: drop exact and near-duplicate images before training.

Duplicated training images are memorized and extracted first (Carlini et al. 2023, "Extracting
Training Data from Diffusion Models", §4.2/§7), and under DP-SGD an image present k times costs k
times the privacy of one, so dedup belongs *before* training (and before DP). Near-duplicates are
found with imagededup's perceptual hashes (or its CNN features), compared by Hamming distance, and
confirmed by the pixel l2 of the pair; every removal is recorded in the manifest with the twin kept.

Choosing the threshold (measured 2026-11-28, imagededup 0.3.3, scikit-learn digits at 16x16, 1797
distinct images, no byte-identical pair among them). imagededup resizes every image to the size its
hash needs (phash: 32x32, then the 8x8 lowest DCT frequencies), so the size we hand it barely
matters: pre-resizing to 8, 12, 24, 32, 64 or 128 px changed the counts below by a few pairs. What
matters is the content: a 64-bit hash of a 16x16 digit cannot tell a slightly noised copy from
another writer's very similar digit. "Distinct pairs" are pairs of different digits flagged as
duplicates; the columns on the right are the fractions of 200 planted copies caught, per kind of copy
(16->12->16 px bicubic; 16->32->16 px; Gaussian noise sigma 4 and 8 of 255; JPEG quality 90 and 75).
phash distances between two hashes are always even (each hash sets about half its bits).

    phash <=   l2 gate   distinct pairs (images) | down12up up32down noise4 noise8 jpeg90 jpeg75
       0       none          0     (0)           |   0.65     0.86     0.47   0.24   0.77   0.54
       2       none          8    (16)           |   0.97     1.00     0.94   0.76   0.99   0.95
       4       none         84   (116)           |   1.00     1.00     0.99   0.98   1.00   0.99
       8       none       1431   (859)           |   1.00     1.00     1.00   0.99   1.00   1.00
      10       none       3714  (1276)           |   1.00     1.00     1.00   1.00   1.00   1.00
       8      0.045          0     (0)           |   1.00     1.00     1.00   0.99   1.00   1.00
      10      0.045          0     (0)           |   1.00     1.00     1.00   1.00   1.00   1.00
      12      0.045          1     (2)           |   1.00     1.00     1.00   1.00   1.00   1.00

No hash threshold alone both keeps every distinct digit and removes the planted copies; the pixel
l2 gate does. Among pairs with phash <= 10, distinct digits are >= 0.051 apart in l2 (the nearest
distinct digit overall is 0.032, so l2 alone also fails), while the planted copies are <= 0.039
(down12up), <= 0.032 (noise8) and <= 0.020 (jpeg75). Hence the defaults ``max_distance_threshold=8``
(one even step of margin below 12, where a false pair appears) and ``max_l2=0.045`` (between 0.039
and 0.051). dhash, ahash and whash are worse at this size (at distance 0 they already flag 24, 101
and 1207 distinct pairs). On the 100 built-in faces at 16x16, phash <= 10 alone flags nothing
distinct. Halving the resolution (16->8->16 px) gives copies 0.05-0.07 away in l2: this default does
not call those duplicates. Re-measure for other data and sizes (``near_duplicate_pairs``).
The defaults are measured for phash: with the same settings dhash, ahash and whash each merge one
pair of distinct digits. Clusters are connected components, so long chains of near-copies can bridge
two distinct images: 10 noised copies (+-3 of 255) of every digit (17970 images) leave 1796 of 1797.
Throughput on 2 CPU cores (whole ``transform_dataset``): phash ~6.1k img/s on the 1797 digits and
~4.0k img/s on those 17970 images (4.5 s; the search is a blocked O(N^2) popcount); dhash ~15k,
ahash ~10k, whash ~0.6k img/s on the digits. Hashing (imagededup, one image at a time) dominates.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from privdiff.membership import ImageTable, Manifest
from privdiff.weights import cached_or_downloaded, load_checked_weights

from .base import Defense

HASH_METHODS = ("phash", "dhash", "whash", "ahash")
METHODS = (*HASH_METHODS, "cnn")
DEFAULT_THRESHOLD = 8
DEFAULT_MAX_L2 = 0.045
DEFAULT_MIN_SIMILARITY = 0.9
MOST_REMOVED = 0.5  # removing more than this share of the rows is reported: the thresholds may be too loose
Method = Literal["phash", "dhash", "whash", "ahash", "cnn"]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _check_settings(method: str, threshold: int, max_l2: float | None, min_similarity: float) -> None:
    if method not in METHODS:
        raise ValueError(f"dedup method must be one of {METHODS}, got {method!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 <= threshold <= 64:
        raise ValueError(f"dedup threshold must be an integer Hamming distance in 0..64, got {threshold!r}")
    if max_l2 is not None and not (isinstance(max_l2, (int, float)) and 0 <= max_l2 <= 1):
        raise ValueError(f"dedup max_l2 must be None or a pixel l2 in [0, 1], got {max_l2!r}")
    if not -1.0 <= float(min_similarity) <= 1.0:
        raise ValueError(f"dedup min_similarity must be a cosine similarity in [-1, 1], got {min_similarity!r}")


def _as_uint8_nchw(images: torch.Tensor | np.ndarray, what: str = "images") -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {array.dtype}")
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (N, C, H, W) with C = 1 or 3, or (N, H, W), got {tuple(array.shape)}")
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------------
@dataclass
class _Encoded:
    """What the search compares: 64-bit hashes (uint64, N) or unit CNN features (float32, N x F)."""

    method: str
    codes: np.ndarray
    flat: np.ndarray  # float32 (N, C*H*W) in [0, 1], for the l2 gate


def _hasher(method: str):
    from imagededup.methods import AHash, DHash, PHash, WHash

    return {"phash": PHash, "dhash": DHash, "whash": WHash, "ahash": AHash}[method](verbose=False)


def _hash_codes(images: np.ndarray, method: str) -> np.ndarray:
    """imagededup's in-memory ``encode_image(image_array=...)``; each 16-hex-digit hash as a uint64."""
    hasher = _hasher(method)
    hwc = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
    return np.array([int(hasher.encode_image(image_array=np.ascontiguousarray(a)), 16) for a in hwc], dtype=np.uint64)


CNN_WEIGHTS_URL = "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth"
CNN_WEIGHTS = "dedup's CNN encoder (torchvision MobileNetV3-Small ImageNet weights)"


def _cnn_weights_help() -> str:
    return (
        f"On a machine with internet, download {CNN_WEIGHTS_URL}, bring the file here and set the dedup option "
        "cnn_weights: PATH (privdiff checks its SHA-256 and loads it weights-only). Or choose a hash method such "
        "as method: phash, which needs no weights"
    )


class MobilenetEncoder(torch.nn.Module):
    """imagededup's CNN encoder: torchvision MobileNetV3-Small cut at global average pooling (576-d features).

    The same layers as ``imagededup.utils.models.MobilenetV3``, built here because that class gets
    its weights through torch's hub loader, which unpickles a cached file without restriction (a
    file planted in the hub cache ran its code during ``privdiff fit``; see ``privdiff.weights``).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_small

        net = mobilenet_v3_small(weights=None)
        net.load_state_dict(state_dict)
        self.body = torch.nn.Sequential(net.features, net.avgpool).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


def load_cnn_encoder(weights: str | Path | None = None) -> MobilenetEncoder:
    """Return imagededup's CNN encoder (MobileNetV3-Small cut at global pooling, eval mode).

    ``weights``: the ImageNet weight file; default the torch hub cache's copy, downloaded there
    when missing and the network allows. Either way its SHA-256 is checked against torchvision's
    and it is loaded weights-only. Raises ``RuntimeError`` (no file to be had) or ``ValueError``
    (a file that is not torchvision's) naming the ``cnn_weights`` option.
    """
    path = Path(weights) if weights is not None else cached_or_downloaded(CNN_WEIGHTS_URL, CNN_WEIGHTS, _cnn_weights_help())
    try:
        state = load_checked_weights(path, CNN_WEIGHTS_URL, CNN_WEIGHTS)
    except ValueError as err:
        raise ValueError(f"{err}. {_cnn_weights_help()}") from err
    return MobilenetEncoder(state).eval()


def _cnn_codes(images: np.ndarray, encoder=None, batch_size: int = 64) -> np.ndarray:
    from PIL import Image

    from imagededup.utils.models import MobilenetV3  # its preprocessing only (a class attribute: no weights load)

    encoder = encoder if encoder is not None else load_cnn_encoder()
    device = next(encoder.parameters()).device
    hwc = np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images
    hwc = hwc.transpose(0, 2, 3, 1)
    features = []
    with torch.no_grad():
        for start in range(0, len(hwc), batch_size):
            batch = torch.stack([MobilenetV3.transform(Image.fromarray(a)) for a in hwc[start : start + batch_size]])
            features.append(encoder(batch.to(device)).float().cpu())
    feats = torch.cat(features) if features else torch.zeros(0, 576)
    return torch.nn.functional.normalize(feats, dim=1).numpy()


def _encode(images: np.ndarray, method: str, encoder=None) -> _Encoded:
    codes = _cnn_codes(images, encoder) if method == "cnn" else _hash_codes(images, method)
    return _Encoded(method, codes, images.reshape(len(images), -1).astype(np.float32) / 255.0)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------
def _distance_block(method: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances (hashes) or cosine distances 1 - cos (CNN) between two blocks of codes."""
    if method == "cnn":
        return 1.0 - a @ b.T
    return np.bitwise_count(a[:, None] ^ b[None, :])


def _l2(flat_a: np.ndarray, flat_b: np.ndarray) -> np.ndarray:
    """Carlini et al. 2023's l2: sqrt of the mean squared pixel difference on [0, 1], row by row."""
    return np.sqrt(np.mean((flat_a - flat_b) ** 2, axis=1))


def _search(
    a: _Encoded,
    b: _Encoded | None,
    threshold: int,
    min_similarity: float,
    max_l2: float | None,
    block: int = 1024,
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, distance) with distance within the threshold and l2 within ``max_l2``.

    ``b=None`` searches ``a`` against itself (i < j); otherwise i indexes ``a`` and j indexes ``b``.
    Blocked: never holds more than ``block`` x len(b) distances.
    """
    other = a if b is None else b
    limit = 1.0 - min_similarity if a.method == "cnn" else threshold
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, len(a.codes), block):
        first = start if b is None else 0  # the self-search only looks at j >= start
        dist = _distance_block(a.method, a.codes[start : start + block], other.codes[first:])
        hit = dist <= limit + (1e-6 if a.method == "cnn" else 0)
        rows, cols = np.nonzero(hit)
        i, j = rows + start, cols + first
        keep = i < j if b is None else np.ones(len(i), dtype=bool)
        i, j, d = i[keep], j[keep], dist[rows[keep], cols[keep]]
        if max_l2 is not None and len(i):
            ok = np.concatenate(
                [_l2(a.flat[i[s : s + 4096]], other.flat[j[s : s + 4096]]) <= max_l2 for s in range(0, len(i), 4096)]
            )
            i, j, d = i[ok], j[ok], d[ok]
        pairs.extend(zip(i.tolist(), j.tolist(), d.tolist()))
    return pairs


def _digests(images: np.ndarray) -> list[bytes]:
    shape = repr(images.shape[1:]).encode()
    return [hashlib.blake2b(shape + row.tobytes(), digest_size=16).digest() for row in images]


def near_duplicate_pairs(
    images: torch.Tensor | np.ndarray,
    method: Method = "phash",
    threshold: int = DEFAULT_THRESHOLD,
    *,
    reference: torch.Tensor | np.ndarray | None = None,
    max_l2: float | None = DEFAULT_MAX_L2,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
) -> list[tuple[int, int, float]]:
    """Find near-duplicate pairs among uint8 images (N, C, H, W), or between them and ``reference``.

    A pair is a near-duplicate when its images are byte-identical, or when the Hamming distance of
    their imagededup hashes is at most ``threshold`` (for ``method="cnn"``: the cosine similarity of
    imagededup's MobileNetV3 features is at least ``min_similarity``) *and* their pixel l2 (Carlini
    et al. 2023: sqrt of the mean squared difference on [0, 1]) is at most ``max_l2`` (None: no l2
    gate). The defaults are measured on 16x16 digits (see the module docstring).

    Returns a list of ``(i, j, distance)`` sorted by (i, j): without ``reference``, i < j index
    ``images``; with it, i indexes ``images`` and j indexes ``reference`` (e.g. held-out images
    against members). ``distance`` is the Hamming distance (an int, 0..64), or 1 - cosine
    similarity for ``cnn``; byte-identical pairs report 0.
    """
    _check_settings(method, threshold, max_l2, min_similarity)
    a_img = _as_uint8_nchw(images)
    b_img = None if reference is None else _as_uint8_nchw(reference, "reference")
    if b_img is not None and b_img.shape[1:] != a_img.shape[1:]:
        raise ValueError(f"images {a_img.shape[1:]} and reference {b_img.shape[1:]} must have the same (C, H, W)")
    encoder = load_cnn_encoder() if method == "cnn" else None
    a = _encode(a_img, method, encoder)
    b = None if b_img is None else _encode(b_img, method, encoder)
    found = {(i, j): d for i, j, d in _search(a, b, threshold, min_similarity, max_l2)}
    # Byte-identical images always count, whatever the method and threshold.
    da = _digests(a_img)
    db = da if b_img is None else _digests(b_img)
    where: dict[bytes, list[int]] = {}
    for j, key in enumerate(db):
        where.setdefault(key, []).append(j)
    for i, key in enumerate(da):
        for j in where.get(key, []):
            if b_img is not None or i < j:
                found[(i, j)] = 0
    cast = float if method == "cnn" else int
    return [(i, j, cast(found[(i, j)])) for i, j in sorted(found)]


def _cluster_roots(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """The lowest row of each row's connected component in the duplicate graph (scipy's connected_components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not edges:
        return list(range(n))
    i, j = np.array(edges, dtype=np.int64).T
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    lowest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(lowest, labels, np.arange(n))
    return lowest[labels].tolist()


# ---------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------
class DedupDefense(Defense):
    """Removes byte-identical and near-duplicate training images, keeping one per duplicate cluster.

    Pairs are found by :func:`near_duplicate_pairs`; clusters are the connected components of the
    duplicate graph (so a chain A~B~C is one cluster even if A and C are far apart). Each cluster
    keeps its lowest row (the first id in the training table: members come before planted copies)
    and every removed id is recorded in the manifest with the kept twin, the distance between the
    two, their pixel l2 and whether they are byte-identical. Deterministic: the same table gives the
    same removals.

    Args:
        method: imagededup hash (``phash``, ``dhash``, ``whash``, ``ahash``) or ``cnn`` (MobileNetV3
            features; needs torchvision's ImageNet weights in the torch hub cache or internet).
        max_distance_threshold: largest Hamming distance (0..64) between hashes that counts as a
            near-duplicate. Measured on 16x16 digits: see the module docstring; imagededup's own
            default of 10 flags thousands of distinct digits at this size unless the l2 gate is on.
        max_l2: also require the pixel l2 on [0, 1] to be at most this (None: hash only).
        min_similarity: for ``cnn``, the cosine similarity at or above which a pair counts
            (imagededup's default 0.9); ignored by the hash methods.
        cnn_weights: for ``cnn``, the MobileNetV3-Small ImageNet weight file (default: the torch
            hub cache's, downloaded when missing); its hash is checked and it is loaded weights-only.
    """

    name = "dedup"
    order = 10

    def __init__(
        self,
        method: Method = "phash",
        max_distance_threshold: int = DEFAULT_THRESHOLD,
        max_l2: float | None = DEFAULT_MAX_L2,
        min_similarity: float = DEFAULT_MIN_SIMILARITY,
        cnn_weights: str | None = None,
    ) -> None:
        _check_settings(method, max_distance_threshold, max_l2, min_similarity)
        self.cnn_weights = cnn_weights
        self.method = method
        self.max_distance_threshold = int(max_distance_threshold)
        self.max_l2 = None if max_l2 is None else float(max_l2)
        self.min_similarity = float(min_similarity)
        self._encoder = None
        self.images_removed = 0
        self.exact_removed = 0
        self.clusters = 0

    def _encoder_for_cnn(self):
        if self.method == "cnn" and self._encoder is None:
            self._encoder = load_cnn_encoder(self.cnn_weights)
        return self._encoder

    def transform_dataset(self, dataset: ImageTable, manifest: Manifest) -> ImageTable:
        images = _as_uint8_nchw(dataset.images)
        n = len(images)
        # 1. byte-identical images, by a digest of the raw uint8 array: an edge to the first copy
        digests = _digests(images)
        first: dict[bytes, int] = {}
        edges: list[tuple[int, int]] = []
        for row, key in enumerate(digests):
            if key in first:
                edges.append((first[key], row))
            else:
                first[key] = row
        unique = np.array(sorted(first.values()), dtype=np.int64)
        # 2. near-duplicates among the distinct images
        encoded = _encode(images, self.method, self._encoder_for_cnn())
        sub = _Encoded(self.method, encoded.codes[unique], encoded.flat[unique])
        edges += [(int(unique[i]), int(unique[j])) for i, j, _ in _search(sub, None, self.max_distance_threshold, self.min_similarity, self.max_l2)]
        # 3. clusters = connected components; each keeps its lowest row, the rest are recorded with it
        roots = _cluster_roots(n, edges)
        kept = [r for r in range(n) if roots[r] == r]
        removed = [r for r in range(n) if roots[r] != r]
        for r in removed:
            k = roots[r]
            distance = _distance_block(self.method, encoded.codes[r : r + 1], encoded.codes[k : k + 1])[0, 0]
            manifest.record_removed(
                dataset.ids[r],
                dataset.ids[k],
                self.name,
                distance=round(float(distance), 6) if self.method == "cnn" else int(distance),
                l2=round(float(_l2(encoded.flat[r : r + 1], encoded.flat[k : k + 1])[0]), 6),
                exact=digests[r] == digests[k],
                method=self.method,
            )
        self.images_removed = len(removed)
        self.exact_removed = sum(digests[r] == digests[roots[r]] for r in removed)
        self.clusters = len({roots[r] for r in removed})
        if n and len(removed) > MOST_REMOVED * n:
            warnings.warn(
                f"dedup removed {len(removed)} of {n} training rows ({len(removed) / n:.0%}; {self.exact_removed} of them "
                f"byte-identical copies) with {self.describe()}. If the data are not mostly copies, the thresholds are "
                "too loose for these images: lower max_distance_threshold / max_l2 (see near_duplicate_pairs) and check "
                "manifest.json's removed list",
                stacklevel=2,
            )
        return dataset.select(kept)

    def metrics(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "images_removed": self.images_removed,
            "exact_removed": self.exact_removed,
            "clusters": self.clusters,
            "method": self.method,
            "threshold": self.min_similarity if self.method == "cnn" else self.max_distance_threshold,
        }
        if self.max_l2 is not None:
            out["max_l2"] = self.max_l2
        return out

    def describe(self) -> str:
        rule = f"cnn≥{self.min_similarity:g}" if self.method == "cnn" else f"{self.method}≤{self.max_distance_threshold}"
        gate = f",l2≤{self.max_l2:g}" if self.max_l2 is not None else ""
        return f"dedup({rule}{gate})"
