"""Package discovery (the rest of the metadata is in pyproject.toml).

The distribution ``privdiff`` is the root package in ``privdiff/`` plus the stages, which keep the
design card's top-level folders: ``train/`` -> ``privdiff.train``, ``defenses/`` -> ``privdiff.defenses``,
``eval/`` -> ``privdiff.eval``. setuptools finds every subpackage below those folders, so a new one
needs no entry here.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {"privdiff": "privdiff", "privdiff.train": "train", "privdiff.defenses": "defenses", "privdiff.eval": "eval"}

setup(
    package_dir=PACKAGE_DIRS,
    packages=[f"{name}.{sub}" if sub else name for name, folder in PACKAGE_DIRS.items() for sub in ["", *find_packages(folder)]],
    package_data={"privdiff.eval": ["templates/*.j2"]},
)
