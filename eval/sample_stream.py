"""The audit's samples drawn and reduced in shards: memory that does not grow with their number, and a killed audit that
resumes from its finished shards.

Carlini et al. 2023 draw 2^20 samples per CIFAR-10 model; held at once, their float32 pixels alone take 12.9 GB. The
audit instead draws ``shard_size`` samples at a time, and every plugin that reads samples keeps only what it needs of
each shard (its :class:`SampleReduction`): a few numbers per sample (nearest-member distances), running sums (FID
statistics), and a bounded set of images (the samples near a member or held-out image, where a copy can be
confirmed). With a folder, every finished shard's reductions are written there (safetensors: nothing is unpickled),
so an audit killed mid-sampling draws only the shards it had not finished when it runs again.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from privdiff.files import write_safetensors_atomic
from privdiff.shard import Shard, gather

from .sampling import saturated_pixels

if TYPE_CHECKING:
    from .sampling import Generated

__all__ = ["KeepAll", "SampleReduction", "Streamed", "concat", "digest", "reduce_at_once", "remove_shards", "stream_samples"]

SHARD_FILE = "shard_{:05d}.safetensors"


class SampleReduction(ABC):
    """What one plugin keeps of the audit's samples, shard by shard, instead of the samples themselves."""

    @abstractmethod
    def update(self, images: Tensor, labels: Tensor | None, first: int) -> dict[str, Tensor]:
        """What to keep of one shard: ``images`` (n, C, H, W) in [0, 1] are the audit's samples ``first`` to
        ``first + n - 1`` (numbered among the samples the generation-side defenses kept, in shard order), ``labels``
        the class (or prompt number) each was drawn for, or None. Tensors only: they are written to disk for resume."""

    @abstractmethod
    def merge(self, shards: list[dict[str, Tensor]]) -> Any:
        """The plugin's view of all samples, from every shard's :meth:`update` output in shard order."""


def concat(shards: list[dict[str, Tensor]], key: str) -> Tensor:
    """One key of every shard's output, concatenated in shard order."""
    return torch.cat([s[key] for s in shards])


def reduce_at_once(reduction: SampleReduction, samples: Tensor, labels: Tensor | None) -> Any:
    """A reduction of samples already in memory: one shard (what a plugin run on a context built by hand gets)."""
    return reduction.merge([reduction.update(samples, labels, 0)])


@dataclass
class Streamed:
    """What the stream leaves: each reduction's merged view, the sampling counts, and where the time went."""

    reduced: dict[str, Any]
    num_samples: int
    num_drawn: int
    num_rejected: int
    saturated: tuple[int, int, int]  # pixels at 0, pixels at 1, pixels in all (sample_sanity's shares, streamed)
    seconds: dict[str, float] = field(default_factory=dict)  # "sample" and each reduction's name
    resumed_shards: int = 0


def digest(*parts: Any, model: torch.nn.Module | None = None) -> str:
    """A fingerprint of what the samples and their reductions depend on (JSON-able parts and the model's weights):
    shards written by another audit are never resumed from."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    if model is not None:
        for name, value in model.state_dict().items():
            h.update(name.encode())
            if isinstance(value, Tensor):
                h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:  # a module's extra state (a dict of settings)
                h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _load(path: Path, fingerprint: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]] | None:
    """A finished shard's reductions and counts, or None when it belongs to another audit or cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return None
            out: dict[str, dict[str, Tensor]] = {}
            for key in f.keys():
                name, _, part = key.partition("/")
                out.setdefault(name, {})[part] = f.get_tensor(key)
    except (OSError, ValueError, RuntimeError):  # a partial or foreign file: draw the shard again
        return None
    return out, meta


def _finished(folder: Path | None, num_shards: int, fingerprint: str, shard: Shard | None) -> dict[int, tuple[dict, dict]]:
    """The shards a previous run of this audit finished; under DDP only those every process can read."""
    found: dict[int, tuple[dict, dict]] = {}
    if folder is not None and folder.is_dir():
        for k in range(num_shards):
            path = folder / SHARD_FILE.format(k)
            if path.is_file() and (loaded := _load(path, fingerprint)) is not None:
                found[k] = loaded
    if shard is not None:
        common = set.intersection(*(set(keys) for keys in gather(sorted(found), shard)))
        found = {k: v for k, v in found.items() if k in common}
    return found


def stream_samples(
    draw: Callable[[int, int, int], "Generated"],
    num_samples: int,
    shard_size: int,
    reductions: Mapping[str, SampleReduction],
    *,
    folder: str | Path | None = None,
    fingerprint: str = "",
    writes: bool = True,
    progress: bool = False,
    shard: Shard | None = None,
) -> Streamed:
    """Draw ``num_samples`` samples ``shard_size`` at a time and pass each shard through every reduction.

    ``draw(k, first, count)`` draws shard ``k`` (samples ``first`` to ``first + count - 1``) through the audit's
    sampler and defenses; it must depend on nothing but its arguments, so that a resumed audit draws what an
    uninterrupted one would. With ``folder``, finished shards whose ``fingerprint`` matches are read back instead of
    drawn, and every newly finished shard is written there (by the process that ``writes``). Only the reductions'
    outputs are kept, never a shard's images.
    """
    if shard_size < 1:
        raise ValueError(f"the audit's shard_size must be >= 1, got {shard_size}")
    folder = Path(folder) if folder is not None else None
    num_shards = -(-num_samples // shard_size)
    finished = _finished(folder, num_shards, fingerprint, shard)
    if folder is not None and finished and writes:
        rank_zero_warn(f"resuming the audit's sampling from {len(finished)} of {num_shards} finished shards in {folder}")
    outputs: dict[str, list[dict[str, Tensor]]] = {name: [] for name in reductions}
    seconds = {"sample": 0.0, **{name: 0.0 for name in reductions}}
    kept = drawn = rejected = low = high = pixels = 0
    bar = tqdm(total=num_samples, desc="audit samples", disable=not progress, leave=False)
    for k in range(num_shards):
        first, count = k * shard_size, min(shard_size, num_samples - k * shard_size)
        if k in finished:
            done, meta = finished[k]
            counts = {key: int(meta[key]) for key in ("kept", "drawn", "rejected", "low", "high", "pixels")}
        else:
            start = time.perf_counter()
            generated = draw(k, first, count)
            seconds["sample"] += time.perf_counter() - start
            images = generated.images
            done = {}
            for name, reduction in reductions.items():
                start = time.perf_counter()
                done[name] = {key: value.detach().cpu().contiguous() for key, value in
                              reduction.update(images, generated.labels, kept).items()}
                seconds[name] += time.perf_counter() - start
            counts = {"kept": len(images), "drawn": generated.num_drawn, "rejected": generated.num_rejected,
                      **dict(zip(("low", "high", "pixels"), saturated_pixels(images)))}
            if folder is not None and writes:
                tensors = {f"{name}/{key}": value for name, parts in done.items() for key, value in parts.items()}
                write_safetensors_atomic(folder / SHARD_FILE.format(k), tensors,
                                         {"fingerprint": fingerprint, **{key: str(v) for key, v in counts.items()}})
            del images, generated
        for name in reductions:
            outputs[name].append(done.get(name, {}))
        kept, drawn, rejected = kept + counts["kept"], drawn + counts["drawn"], rejected + counts["rejected"]
        low, high, pixels = low + counts["low"], high + counts["high"], pixels + counts["pixels"]
        bar.update(count)
    bar.close()
    reduced = {}
    for name, reduction in reductions.items():
        start = time.perf_counter()
        reduced[name] = reduction.merge(outputs[name])
        seconds[name] += time.perf_counter() - start
    return Streamed(reduced, kept, drawn, rejected, (low, high, pixels), seconds, len(finished))


def remove_shards(folder: str | Path) -> None:
    """Delete a finished audit's shard files (they hold samples near members: copies of training images)."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.glob("shard_*.safetensors"):
            path.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # something else lives there: leave the folder


class KeepAll(SampleReduction):
    """Every sample and its label, for a plugin that reads ``AuditContext.samples`` whole (memory grows with them)."""

    def update(self, images: Tensor, labels: Tensor | None, first: int) -> dict[str, Tensor]:
        return {"images": images, **({"labels": labels} if labels is not None else {})}

    def merge(self, shards: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor | None]:
        shards = [s for s in shards if s and len(s["images"])]
        if not shards:
            return torch.empty(0), None
        return concat(shards, "images"), concat(shards, "labels") if "labels" in shards[0] else None
