"""``python -m bench [suite ...]``: run the named suites (default: all)."""

from __future__ import annotations

import sys

from bench import producer

SUITES = {"producer": producer.main}


def main() -> None:
    names = sys.argv[1:] or list(SUITES)
    for name in names:
        if name not in SUITES:
            sys.exit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        SUITES[name]()


main()
