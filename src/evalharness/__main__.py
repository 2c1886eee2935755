"""Command line: ``python -m evalharness [overrides]`` (``-m`` for a sweep); see `cli`."""

from evalharness.cli import main

if __name__ == "__main__":
    main()
