"""``python -m bench [producer|worker] [--smoke]``: run one suite, or all of them."""

from __future__ import annotations

import sys

from bench import incident, producer, worker


def main() -> None:
    args = sys.argv[1:]
    smoke = [a for a in args if a == "--smoke"]
    names = [a for a in args if a != "--smoke"] or ["producer", "worker"]
    for name in names:
        if name == "producer":
            producer.main()
        elif name == "worker":
            worker.main(smoke)
        elif name == "incident":
            incident.main()
        else:
            sys.exit(f"unknown suite {name!r}; choose from producer, worker, incident")


main()
