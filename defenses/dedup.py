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

import warnings


from privdiff.duplicates import (  # noqa: F401 - near_duplicate_pairs is dedup's criterion, kept importable here
    DEFAULT_MAX_L2,
    DEFAULT_MIN_SIMILARITY,
    DEFAULT_THRESHOLD,
    Method,
    check_settings,
    cluster_near_duplicates,
    near_duplicate_pairs,
)
from privdiff import duplicates
from privdiff.membership import ImageTable, Manifest

from .base import Defense

MOST_REMOVED = 0.5  # removing more than this share of the rows is reported: the thresholds may be too loose

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
        check_settings(method, max_distance_threshold, max_l2, min_similarity)
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
            self._encoder = duplicates.load_cnn_encoder(self.cnn_weights)
        return self._encoder

    def transform_dataset(self, dataset: ImageTable, manifest: Manifest) -> ImageTable:
        n = len(dataset)
        clusters = cluster_near_duplicates(
            dataset.images, self.method, self.max_distance_threshold, max_l2=self.max_l2,
            min_similarity=self.min_similarity, encoder=self._encoder_for_cnn(),
        )
        roots = clusters.roots
        kept = [r for r in range(n) if roots[r] == r]
        removed = [r for r in range(n) if roots[r] != r]
        records = {r: clusters.describe_pair(r, roots[r]) for r in removed}
        for r in removed:
            manifest.record_removed(dataset.ids[r], dataset.ids[roots[r]], self.name, **records[r], method=self.method)
        self.images_removed = len(removed)
        self.exact_removed = sum(bool(records[r]["exact"]) for r in removed)
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
