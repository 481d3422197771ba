"""Training-set deduplication: drop exact and near-duplicate images before training.

Duplicated training images are memorized and extracted first (Carlini et al. 2023, "Extracting
Training Data from Diffusion Models", §4.2/§7), and under DP-SGD an image present k times costs k
times the privacy of one, so dedup belongs *before* training (and before DP). Near-duplicates are
found with imagededup's perceptual hashes (or its CNN features), compared by Hamming distance, and
confirmed by the pixel l2 of the pair; every removal is recorded in the manifest with the twin kept.

Why a hash threshold needs the pixel gate: a 64-bit perceptual hash of a small image cannot tell a
slightly noised copy from another writer's very similar digit, and pixel l2 alone cannot either (the
nearest distinct digit can be closer than a JPEG copy), but together they separate them. The defaults
(phash Hamming <= 8 and pixel l2 <= 0.045) were chosen on 16x16 digits with planted copies of six
kinds; the measurements, and how the other hashes and sizes fare, are in docs/benchmarks.md
("dedup thresholds"). Re-measure for other data and sizes with ``near_duplicate_pairs``.
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
            near-duplicate. Chosen on 16x16 digits (docs/benchmarks.md, "dedup thresholds"); imagededup's own
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
