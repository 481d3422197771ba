"""Caption randomization: a training-side mitigation of copying in text-to-image models.

Somepalli et al. 2023 ("Understanding and Mitigating Copying in Diffusion Models", §6) find that a
model copies a training image mostly when its caption is seen verbatim with it again and again;
randomizing the caption at each step (random word replacement, random word insertion, Gaussian
noise on the text embedding) lowers the copying of duplicated image-caption pairs at little cost in
quality. It gives NO formal guarantee: the images are still seen as often as before.

The replacement and inserted words are drawn from the vocabulary of the training captions, so a
randomized caption stays in the language of the data set. The draws come from a generator seeded
from the operating system at each process start: a mitigation whose randomness an observer of the
config could replay would be weaker, and it must not repeat the same edits after a resume.
"""

from __future__ import annotations

import secrets

import numpy as np

from privdiff.membership import ImageTable, Manifest
from privdiff.model import Batch

from .base import Defense

DISCLAIMER = "no formal guarantee: an empirical mitigation of copying (Somepalli et al. 2023)"


class CaptionRandomization(Defense):
    """Randomizes each training caption at every step (Somepalli et al. 2023's RC/RT/GN mitigations).

    Args:
        probability: share of the batch's captions that are randomized at each step.
        replace_words: words of a randomized caption replaced by a random vocabulary word
            (Somepalli's "random token replacement").
        insert_words: random vocabulary words inserted at random places ("random token addition").
        embedding_noise: standard deviation of Gaussian noise added to the text embedding of every
            training caption ("Gaussian noise", GN; 0 = off). The model applies it
            (``Batch.cond_noise``), so it reaches only models with a text encoder.
    """

    name = "caption_randomization"
    order = 20

    def __init__(self, probability: float = 0.5, replace_words: int = 2, insert_words: int = 2, embedding_noise: float = 0.0) -> None:
        if not 0 < probability <= 1:
            raise ValueError(f"caption_randomization.probability must be in (0, 1], got {probability}")
        if replace_words < 0 or insert_words < 0 or embedding_noise < 0:
            raise ValueError("caption_randomization needs replace_words, insert_words, embedding_noise >= 0, got "
                             f"{replace_words}, {insert_words}, {embedding_noise}")
        if replace_words == insert_words == 0 and embedding_noise == 0:
            raise ValueError("caption_randomization does nothing with replace_words = insert_words = embedding_noise = 0")
        self.probability, self.replace_words, self.insert_words = float(probability), int(replace_words), int(insert_words)
        self.embedding_noise = float(embedding_noise)
        self.vocabulary: list[str] = []
        self.rng = np.random.default_rng(secrets.randbits(128))
        self.seen = 0
        self.randomized = 0

    def transform_dataset(self, dataset: ImageTable, manifest: Manifest) -> ImageTable:
        if dataset.captions is None:
            raise ValueError(
                "caption_randomization needs captioned training data (data.source: captioned_digits, or "
                "data.caption_column for a folder's metadata.jsonl or a Hugging Face dataset)"
            )
        self.vocabulary = sorted({w for c in dataset.captions for w in c.split()})
        return dataset

    def randomize(self, caption: str) -> str:
        """One randomized version of ``caption`` (word replacement, then insertion)."""
        words = caption.split()
        if not self.vocabulary:
            raise RuntimeError("caption_randomization has no vocabulary yet: the data module sets it in setup")
        for i in self.rng.choice(len(words), size=min(self.replace_words, len(words)), replace=False) if words else []:
            words[int(i)] = self.vocabulary[int(self.rng.integers(len(self.vocabulary)))]
        for _ in range(self.insert_words):
            words.insert(int(self.rng.integers(len(words) + 1)), self.vocabulary[int(self.rng.integers(len(self.vocabulary)))])
        return " ".join(words)

    def transform_batch(self, batch: Batch) -> Batch:
        if not isinstance(batch.cond, list):
            raise ValueError("caption_randomization applies to text-to-image training: this batch carries no captions")
        chosen = self.rng.random(len(batch.cond)) < self.probability
        captions = [self.randomize(c) if pick and c else c for c, pick in zip(batch.cond, chosen.tolist())]
        self.seen += len(captions)
        self.randomized += int(chosen.sum())
        return Batch(batch.images, captions, batch.rows, max(batch.cond_noise, self.embedding_noise))

    def metrics(self) -> dict[str, float | int | str]:
        return {"captions_randomized": self.randomized, "captions_seen": self.seen, "embedding_noise": self.embedding_noise}

    def describe(self) -> str:
        return "caption_randomization"
