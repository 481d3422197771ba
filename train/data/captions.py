"""Captions of the built-in captioned sets: what a digit or photograph shows, and a signature of words unique to it."""

from __future__ import annotations

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SIGNATURE = (
    ("amber", "azure", "brisk", "calm", "coral", "dusky", "eager", "fern", "gentle", "hazel", "ivory", "jade", "keen", "lunar", "misty", "noble"),
    ("falcon", "otter", "heron", "badger", "lynx", "sparrow", "walrus", "marten", "gecko", "bison", "crane", "ferret", "koala", "newt", "puffin", "raven"),
    ("river", "meadow", "harbor", "canyon", "forest", "island", "valley", "summit"),
)


def signature(index: int) -> str:
    """Three words unique to ``index`` (16 x 16 x 8 = 2048 indices): what makes a built-in caption a caption of its own."""
    a, b, c = _SIGNATURE
    return f"{a[index % 16]} {b[(index // 16) % 16]} of the {c[(index // 256) % 8]}"


def photo_caption(index: int, image: np.ndarray, subject: str) -> str:
    """A caption for a built-in photograph or face: its subject, its tone (from the pixels) and a signature."""
    tone = image.astype(np.float64).mean() / 255.0
    light = "dark" if tone < 0.3 else "bright" if tone > 0.65 else "mid-toned"
    return f"a {light} photo of {subject}, taken by the {signature(index)}"


def digit_caption(index: int, image: np.ndarray, label: int) -> str:
    """A caption for digit ``index``: its class, stroke weight and slant (from the pixels), and a signature
    of three words unique to the index (16 x 16 x 8 = 2048 > 1797 digits), as people caption photos."""
    ink = image.astype(np.float64) / 255.0
    weight = "thin" if ink.mean() < 0.18 else "bold" if ink.mean() > 0.30 else "plain"
    ys, xs = np.nonzero(ink > 0.5)
    slope = 0.0 if len(xs) < 2 else float(np.polyfit(ys, xs, 1)[0]) if np.ptp(ys) > 0 else 0.0
    slant = "leaning right" if slope < -0.15 else "leaning left" if slope > 0.15 else "upright"
    return f"a {weight} handwritten {DIGIT_NAMES[label]}, {slant}, signed by the {signature(index)}"
