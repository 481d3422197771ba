"""``python -m privdiff``: the same as the ``privdiff`` command."""

from privdiff.cli import main

if __name__ == "__main__":
    main()
