"""Which ``GenerativeModel`` implementation reads a saved folder (for audits of a saved model)."""

from __future__ import annotations

from pathlib import Path

from privdiff.model import GenerativeModel

from .cascade import PixelCascade
from .gan import DCGAN
from .latent import LatentTextToImage
from .pixel import PixelDiffusion
from .pixel_text import PixelTextToImage

# Each implementation recognises its own folders (diffusers' model_index.json names the pipeline; a GAN's config.json
# names its class). A cascade's base stage is an IFPipeline folder too, so the cascade (which also needs its
# super_resolution/) is asked first.
IMPLEMENTATIONS: tuple[type[GenerativeModel], ...] = (PixelDiffusion, LatentTextToImage, PixelCascade, PixelTextToImage, DCGAN)


def load_model(path: str | Path) -> GenerativeModel:
    """Load a model folder written by ``privdiff fit`` (``<run>/model``) with the implementation that wrote it."""
    path = Path(path)
    for implementation in IMPLEMENTATIONS:
        if implementation.is_folder(path):
            return implementation.from_pretrained(path)
    return PixelDiffusion.from_pretrained(path)  # names what a folder lacks when none recognises it
