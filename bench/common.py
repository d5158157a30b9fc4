"""What benchmarks share: a throwaway RabbitMQ vhost, and reporting."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import uuid
from collections.abc import Iterator, Sequence
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


def suite_args(prog: str, parts: tuple[str, ...], argv: list[str] | None) -> tuple[bool, set[str]]:
    """A suite's command line: ``--smoke`` and ``--parts``; returns both."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: harness check only")
    parser.add_argument(
        "--parts", default=",".join(parts), help=f"comma-separated, of {', '.join(parts)}"
    )
    args = parser.parse_args(argv)
    chosen = set(args.parts.split(","))
    if chosen - set(parts):
        parser.error(f"unknown parts: {', '.join(sorted(chosen - set(parts)))}")
    return args.smoke, chosen


def suite_name(suite: str, parts: set[str], all_parts: Sequence[str], smoke: bool) -> str:
    """The results file's name: a run of some parts keeps a file of its own
    (``worker-b1-b8``), so that it never replaces a full run's figures."""
    name = suite if parts == set(all_parts) else "-".join([suite, *sorted(parts)])
    return f"{name}-smoke" if smoke else name


def amqp_url(name: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{name}"


def report(suite: str, rows: list[tuple[str, str]], figures: dict[str, object]) -> None:
    """Print the figures, and keep them as JSON: bench/results/ is committed with the
    README's figures (machine, date, commit) so they can be checked from the repository;
    smoke runs go to bench/results/smoke/, which is not."""
    width = max(len(label) for label, _ in rows)
    print(f"\n{suite}")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    folder = RESULTS / "smoke" if figures.get("smoke") else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{suite}.json"
    out.write_text(
        json.dumps(
            {
                "suite": suite,
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": _commit(),
                "machine": {
                    "python": platform.python_version(),
                    "cpus": _cpus(),
                    "cpu": _cpu_model(),
                    "load_average": _load(),
                },
                "figures": figures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"  (written to {out})")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    return (result.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]
