"""Image sources, preprocessing, the seeded membership split and its manifest, and the data module.

Every run trains on *members* and keeps *held-out* images that were never trained on as the
non-members of membership inference. Both are chosen by a seeded shuffle and written to
``manifest.json`` in the run directory with stable ids, so that every attack and metric is computed
against the same split and the same seed gives the same split.
"""

from privdiff.membership import ImageTable, Manifest  # the tables the data stage fills, importable from here too

from .captions import DIGIT_NAMES, digit_caption, photo_caption, signature
from .module import HELDOUT_PREFIX, DiffusionDataModule, HeldoutSource, load_canaries, load_source
from .sources import BUILTIN_SOURCES, PHOTOS, class_indices, load_builtin, load_folder, load_hf, to_uint8_image
from .split import Split, membership_split

__all__ = [
    "BUILTIN_SOURCES", "DIGIT_NAMES", "HELDOUT_PREFIX", "PHOTOS", "DiffusionDataModule", "HeldoutSource", "ImageTable",
    "Manifest", "Split",
    "class_indices", "digit_caption", "load_builtin", "load_canaries", "load_folder", "load_hf", "load_source",
    "membership_split", "photo_caption", "signature", "to_uint8_image",
]
