"""``python -m bench [producer|worker [--parts b1,b8]] [--smoke]``: run one suite, or all
of them. Options after ``worker`` go to the worker suite."""

from __future__ import annotations

import sys

from bench import incident, producer, worker


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["worker"]:
        worker.main(args[1:])
        return
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
