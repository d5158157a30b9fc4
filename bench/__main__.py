"""``python -m bench [producer|worker [--parts b1,b8]|stage [--parts b7,hop,b3]|incident]
[--smoke]``: run one suite, or the producer and worker suites. Options after ``worker``
or ``stage`` go to that suite."""

from __future__ import annotations

import sys

from bench import incident, producer, stage, worker


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["worker"]:
        worker.main(args[1:])
        return
    if args[:1] == ["stage"]:
        stage.main(args[1:])
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
            sys.exit(f"unknown suite {name!r}; choose from producer, worker, stage, incident")


main()
