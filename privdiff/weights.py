"""Loading published network weights without trusting the file: hash checked, unpickled weights-only.

torch's hub loader (``torch.hub.load_state_dict_from_url``, which torchvision and torch-fidelity
use) unpickles a file it finds in its cache with ``weights_only=False`` and re-checks no hash for
it, so a file planted in ``$TORCH_HOME/hub/checkpoints/`` runs its code when a model is built
(dedup's CNN encoder did; design.md, "Known traps"). Here a weight file is accepted only when its
SHA-256 starts with the prefix its publisher put in the file name (``NAME-<prefix>.pth``, the
torchvision and torch-fidelity convention, which ``torch.hub`` checks only on download), and it
is read with ``torch.load(weights_only=True)``, which builds tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

__all__ = ["cached_or_downloaded", "hash_prefix", "load_checked_weights"]


def privdiff_cache(kind: str) -> Path:
    """The folder where privdiff keeps what it trains or builds once (``$XDG_CACHE_HOME/privdiff/<kind>``)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "privdiff" / kind


def hash_prefix(url: str) -> str:
    """The SHA-256 prefix in a published weight file's name: ``.../NAME-<prefix>.pth`` -> ``<prefix>``."""
    return url.rsplit("/", 1)[-1].rsplit("-", 1)[-1].split(".", 1)[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checked_weights(path: str | Path, url: str, what: str) -> dict[str, torch.Tensor]:
    """Return the state dict in ``path`` after checking it is the file published at ``url``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file, and
    loading nothing) when its SHA-256 does not start with ``hash_prefix(url)`` or it holds
    anything but tensors and plain containers. ``what`` names the weights in messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weight file {path} does not exist (download {url})")
    expected, actual = hash_prefix(url), _sha256(path)
    if not actual.startswith(expected):
        raise ValueError(
            f"{what}: {path} is not the published file {url.rsplit('/', 1)[-1]}: its SHA-256 starts {actual[:12]}, "
            f"not {expected}. Nothing was loaded from it; download the file again from {url}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{what}: refused to load {path}: it holds objects other than tensors ({err})") from err


def cached_or_downloaded(url: str, what: str, help_text: str) -> Path:
    """The torch hub cache's copy of ``url``, downloaded there (hash-checked) when missing.

    The cache is only a default place to look: the caller still loads the file with
    :func:`load_checked_weights`. Raises ``RuntimeError`` with ``help_text`` when the file is
    missing and cannot be downloaded (an offline machine).
    """
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix(url), progress=False)
    except Exception as err:  # noqa: BLE001 - urllib, http and torch raise many types when offline
        raise RuntimeError(f"{what}: {url} could not be downloaded ({type(err).__name__}: {err}). {help_text}") from err
    return target


def require_safetensors(folder: str | Path, model_class: str) -> None:
    """Refuse a diffusers/transformers model folder whose weights are not safetensors (a .bin/.pt file is a
    pickle that can run code when loaded); the message says how to convert it. ``model_class`` names the
    class whose ``from_pretrained`` reads the folder (for that conversion)."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    found = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name != "config.json") if folder.is_dir() else []
    raise ValueError(
        f"{folder} holds no safetensors weights (found {found or 'nothing'}). privdiff loads weights "
        "from safetensors only: a .bin/.pt file is a pickle that can run code when loaded. If you trust it, "
        f"convert it on a machine you trust: {model_class}.from_pretrained(DIR, use_safetensors=False)"
        ".save_pretrained(DIR, safe_serialization=True)"
    )
