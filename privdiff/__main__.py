"""``python -m privdiff``: the same as the ``privdiff`` command."""

from privdiff.train.cli import main

if __name__ == "__main__":
    main()
