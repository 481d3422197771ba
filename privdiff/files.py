"""Atomic file writes: a crash or a kill mid-write leaves the previous file, never half of a new one.

Every writer of a run's files (manifest, defenses record, audit, metrics, caches of weights) goes through
:func:`atomic_path`: write to a temporary file beside the target, unique to the process (several processes may
write the same cache at once), then ``os.replace`` it onto the target, which is atomic on one file system.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_json_atomic", "write_safetensors_atomic", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path``, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> None:
    """Write ``data`` as JSON (``json.dumps(data, **dumps)``, indent 1 by default) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, **{"indent": 1, **dumps}))


def write_safetensors_atomic(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> tensor) and string ``metadata`` to a safetensors file at ``path`` atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
