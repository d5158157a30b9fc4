"""What benchmarks share: a throwaway RabbitMQ vhost, and reporting."""

from __future__ import annotations

import json
import platform
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@contextmanager
def vhost() -> Iterator[str]:
    name = f"clusteralert-bench-{uuid.uuid4().hex[:8]}"
    run = ["rabbitmqctl", "-q"]
    subprocess.run([*run, "add_vhost", name], check=True, capture_output=True)
    subprocess.run(
        [*run, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run([*run, "delete_vhost", name], check=False, capture_output=True)


def amqp_url(name: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{name}"


def report(suite: str, rows: list[tuple[str, str]], figures: dict[str, object]) -> None:
    width = max(len(label) for label, _ in rows)
    print(f"\n{suite}")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{suite}.json"
    out.write_text(
        json.dumps(
            {
                "suite": suite,
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"python": platform.python_version(), "cpus": _cpus()},
                "figures": figures,
            },
            indent=2,
        )
    )
    print(f"  (written to {out})")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
