"""CPU time per mail, per process, read from /proc: what a figure in mails/s is made of.

On one small machine the worker, RabbitMQ and the bench relay share the cores, so a
throughput figure says as much about the other two as about the worker. The CPU each
spent between the first and the last mail of a run, divided by the mails, does not move
with the machine's other load the way mails/s does, and it names the part that costs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` (every thread), or 0.0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces: the fields after it are counted from ")".
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, if one runs here."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "beam.smp":
                return int(entry.name)
        except OSError:
            continue
    return None


class CpuMeter:
    """``start()`` then ``stop(mails)``: milliseconds of CPU per mail for each named
    process, and their sum as ``total``."""

    def __init__(self, pids: Mapping[str, int | None]):
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self, mails: int) -> dict[str, float]:
        per_mail = {
            name: 1000 * (cpu_seconds(pid) - self._start[name]) / max(mails, 1)
            for name, pid in self.pids.items()
        }
        return per_mail | {"total": sum(per_mail.values())}


def most_per_s(cpu_ms: Mapping[str, float], cores: int | None = None) -> float:
    """Mails/s this machine's cores could take at most at that CPU per mail, were every
    core busy all the time."""
    total = cpu_ms.get("total", 0.0)
    return (cores or os.cpu_count() or 1) * 1000 / total if total > 0 else float("inf")
