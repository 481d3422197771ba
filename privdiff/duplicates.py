"""Near-duplicate images: imagededup's perceptual hashes (or its CNN features) confirmed by pixel l2.

The one definition of "near-copy" in privdiff: deduplication removes such pairs from the training
set (``privdiff.defenses.dedup``), and the audit groups members that are near-copies of each other
(a sample copying one of two copies is a copy of the group). A pair is a near-duplicate when its
images are byte-identical, or when their hashes are within a Hamming distance and their pixel l2
(Carlini et al. 2023) is within ``max_l2``; the defaults and how they were measured are in
``privdiff.defenses.dedup``'s docstring.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from privdiff.distances import l2
from privdiff.weights import cached_or_downloaded, load_checked_weights

__all__ = [
    "DEFAULT_MAX_L2", "DEFAULT_MIN_SIMILARITY", "DEFAULT_THRESHOLD", "METHODS", "DuplicateClusters", "Method",
    "check_settings", "cluster_near_duplicates", "load_cnn_encoder", "near_duplicate_groups", "near_duplicate_pairs",
]

HASH_METHODS = ("phash", "dhash", "whash", "ahash")
METHODS = (*HASH_METHODS, "cnn")
DEFAULT_THRESHOLD = 8
DEFAULT_MAX_L2 = 0.045
DEFAULT_MIN_SIMILARITY = 0.9
Method = Literal["phash", "dhash", "whash", "ahash", "cnn"]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def check_settings(method: str, threshold: int, max_l2: float | None, min_similarity: float) -> None:
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
    """:func:`privdiff.distances.l2` (Carlini et al. 2023) of aligned rows of the float codes' pixels."""
    return l2(torch.from_numpy(flat_a), torch.from_numpy(flat_b)).numpy()


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
    check_settings(method, threshold, max_l2, min_similarity)
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


def cluster_roots(n: int, edges: list[tuple[int, int]]) -> list[int]:
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



@dataclass
class DuplicateClusters:
    """Connected components of the near-duplicate graph of N images.

    ``roots[r]`` is the lowest row of row r's cluster (a chain A~B~C is one cluster even if A and
    C are far apart); :meth:`describe_pair` gives the code distance, pixel l2 and exactness of a
    row and its root, for records.
    """

    roots: list[int]
    method: str
    encoded: _Encoded
    digests: list[bytes]

    def describe_pair(self, row: int, root: int) -> dict[str, object]:
        distance = _distance_block(self.method, self.encoded.codes[row : row + 1], self.encoded.codes[root : root + 1])[0, 0]
        return {
            "distance": round(float(distance), 6) if self.method == "cnn" else int(distance),
            "l2": round(float(_l2(self.encoded.flat[row : row + 1], self.encoded.flat[root : root + 1])[0]), 6),
            "exact": self.digests[row] == self.digests[root],
        }


def cluster_near_duplicates(
    images: torch.Tensor | np.ndarray,
    method: Method = "phash",
    threshold: int = DEFAULT_THRESHOLD,
    *,
    max_l2: float | None = DEFAULT_MAX_L2,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    encoder=None,
) -> DuplicateClusters:
    """Cluster uint8 images (N, C, H, W) by the near-duplicate criterion of :func:`near_duplicate_pairs`.

    Byte-identical images are linked first (by a digest of their pixels), then near-duplicates
    among the distinct ones. Deterministic: the same images give the same clusters.
    """
    check_settings(method, threshold, max_l2, min_similarity)
    array = _as_uint8_nchw(images)
    digests = _digests(array)
    first: dict[bytes, int] = {}
    edges: list[tuple[int, int]] = []
    for row, key in enumerate(digests):
        if key in first:
            edges.append((first[key], row))
        else:
            first[key] = row
    unique = np.array(sorted(first.values()), dtype=np.int64)
    if method == "cnn" and encoder is None:
        encoder = load_cnn_encoder()
    encoded = _encode(array, method, encoder)
    sub = _Encoded(method, encoded.codes[unique], encoded.flat[unique])
    edges += [(int(unique[i]), int(unique[j])) for i, j, _ in _search(sub, None, threshold, min_similarity, max_l2)]
    return DuplicateClusters(cluster_roots(len(array), edges), method, encoded, digests)


def near_duplicate_groups(
    images: torch.Tensor | np.ndarray,
    method: Method = "phash",
    threshold: int = DEFAULT_THRESHOLD,
    *,
    max_l2: float | None = DEFAULT_MAX_L2,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
) -> list[int]:
    """For each image, the lowest index of its group of near-copies (see :func:`cluster_near_duplicates`)."""
    return cluster_near_duplicates(images, method, threshold, max_l2=max_l2, min_similarity=min_similarity).roots
