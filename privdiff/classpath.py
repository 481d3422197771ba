"""Resolve a ``class_path`` ("package.module.Class", as LightningCLI configs write it) to the class."""

from __future__ import annotations

import importlib

__all__ = ["class_from_path"]


def class_from_path(class_path: str) -> type:
    """Import ``package.module`` and return its ``Class``; ``ValueError`` naming the path when either is missing."""
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"class_path {class_path!r} must name a module and a class, e.g. privdiff.eval.mia.MembershipInference")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path {class_path!r} cannot be loaded: {err}") from err
    if not isinstance(found, type):
        raise ValueError(f"class_path {class_path!r} is not a class")
    return found
