"""privdiff: train diffusion models with pluggable privacy defenses, then audit them for memorization.

The package root holds what every stage may import (the model interface, safe weight loading)
and the command line that puts the stages together; the stages are the subpackages
``privdiff.train``, ``privdiff.defenses`` and ``privdiff.eval``.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.2.0"

# In a checkout the subpackages are the top-level folders train/, defenses/ and eval/ beside this
# one (the layout the design card asks for), and pyproject maps them into this package when it is
# installed. When Python finds this folder itself -- the checkout is the current directory, so it
# comes before the installed package on sys.path -- let the package see those folders too.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "train" / "__init__.py").is_file() and not (Path(__file__).resolve().parent / "train").exists():
    __path__.append(str(_checkout))  # type: ignore[name-defined]  # noqa: F821 - a package's own __path__
