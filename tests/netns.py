"""Network-and-mount namespaces for running real cluster daemons in tests.

A namespace is held by a ``sleep`` that ``unshare`` execs (no fork: its PID is the
namespace's), and commands enter it with ``nsenter``, which execs too, so the PID of a
daemon started through it is the daemon's. Inside, chosen host directories are replaced
by bind mounts of the test's own (the mounts are private to the namespace), and
``/dev/shm`` by a fresh tmpfs, so the daemons' state, IPC files and sockets (abstract
sockets belong to the network namespace) never meet the host's. When the test ends,
every process left in the namespace is stopped by its PID and the holder exits, which
removes the namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from tests.waiting import wait_until

__all__ = ["Namespace"]


class Namespace:
    def __init__(self, name: str, binds: Mapping[str, Path]):
        self.name = name
        # mount -n: libmount would otherwise record the mounts under the host's /run.
        script = ["set -e"]
        for target, source in binds.items():
            script.append(f"mount -n --bind '{source}' '{target}'")
        script += [
            "mount -n -t tmpfs -o mode=1777 tmpfs /dev/shm",
            "ip link set lo up",
            "echo ready",
            "exec sleep infinity",
        ]
        self._holder = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                "; ".join(script),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._holder.stdout is not None
        # The script either prints "ready" or exits (end of file): no deadline needed.
        if self._holder.stdout.readline().strip() != "ready":
            error = self._holder.stderr.read() if self._holder.stderr else ""
            self._holder.wait(10)
            raise AssertionError(f"namespace {name}: {error.strip()}")
        self.pid = self._holder.pid
        self._inode = os.stat(f"/proc/{self.pid}/ns/net").st_ino
        self._daemons: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def command(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "--", *args]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done.stdout

    def start(self, *args: str, log: Path, env: Mapping[str, str] | None = None) -> int:
        """Start a daemon in the namespace; returns its PID (nsenter execs it)."""
        out = log.open("ab")
        proc = subprocess.Popen(
            self.command(*args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self._daemons.append((proc, out))
        return proc.pid

    def stop(self, pid: int, timeout: float) -> None:
        """SIGTERM one daemon started here, SIGKILL after ``timeout``; waits for it."""
        for proc, out in self._daemons:
            if proc.pid == pid:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
                out.close()
                return
        raise AssertionError(f"{pid} was not started in {self.name}")

    def pids(self) -> list[int]:
        """Processes in the namespace, the holder apart."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == self._inode:
                    found.append(int(entry))
        return found

    def close(self) -> None:
        """Stop what is still running in the namespace (by PID), then the holder."""
        for proc, _ in self._daemons:
            if proc.poll() is None:
                self.stop(proc.pid, 60)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not self.pids(), 30, f"processes in {self.name} to exit")
        for _, out in self._daemons:
            out.close()
        self._holder.kill()
        self._holder.wait(30)
        if self._holder.stdout:
            self._holder.stdout.close()
        if self._holder.stderr:
            self._holder.stderr.close()
        wait_until(lambda: not self.pids(), 30, f"namespace {self.name} to empty")
