"""The durable spool: one file per event, in a directory on the node.

An event counts as accepted only when it survives a power cut: it is written to a temp
file, fsynced, renamed into place, and the directory is fsynced so the rename itself is
on disk. Names sort by creation time, so the forwarder sends in order.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from shared.errors import SpoolError
from shared.event import Event, encode_event

__all__ = ["SUFFIX", "Spool"]

SUFFIX: Final = ".json"
_TMP_PREFIX: Final = ".tmp-"
REJECTED_DIR: Final = "rejected"


class Spool:
    def __init__(self, directory: Path):
        self.directory = directory

    def ensure(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise SpoolError(f"cannot create spool {self.directory}: {exc.strerror}") from None

    def write(self, event: Event) -> Path:
        """Make ``event`` durable and return its file. Raises :class:`SpoolError` with a
        one-line reason (disk full, permissions); a half-written file never stays."""
        self.ensure()
        data = encode_event(event)
        name = f"{time.time_ns():020d}-{event.id}{SUFFIX}"
        final = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            self._sync_dir()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            reason = "spool is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise SpoolError(f"cannot write to spool {self.directory}: {reason}") from None
        return final

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def pending(self) -> Iterator[Path]:
        """Spooled events, oldest first. Temp files of writers in progress are skipped."""
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(self.directory)
                if entry.name.endswith(SUFFIX)
                and not entry.name.startswith(".")
                and entry.is_file()
            )
        except FileNotFoundError:
            return
        for name in names:
            yield self.directory / name

    def reject(self, path: Path) -> Path:
        """Move an unreadable spool file aside instead of deleting it: nothing is lost,
        and the forwarder does not trip over it again."""
        target_dir = self.directory / REJECTED_DIR
        target_dir.mkdir(exist_ok=True, mode=0o750)
        target = target_dir / path.name
        os.replace(path, target)
        return target
