"""Wake the forwarder when a file lands in the spool, within milliseconds.

Linux inotify through ctypes, so the node agent needs no extra package. Where inotify is
unavailable (another OS, or a watch limit reached), it degrades to a short poll and says
so once in the log, rather than failing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from pathlib import Path
from typing import Final

__all__ = ["FALLBACK_POLL", "SpoolWatcher"]

log = logging.getLogger(__name__)

_IN_CLOSE_WRITE: Final = 0x00000008
_IN_MOVED_TO: Final = 0x00000080
_IN_NONBLOCK: Final = 0o4000
_IN_CLOEXEC: Final = 0o2000000
FALLBACK_POLL: Final = 0.2  # seconds between spool scans without inotify


class SpoolWatcher:
    def __init__(self, directory: Path):
        self._fd = -1
        # A self-pipe, so that a stop request (even from a signal handler) ends a wait
        # at once instead of after the idle tick.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            wd = libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MOVED_TO | _IN_CLOSE_WRITE)
            if wd < 0:
                err = ctypes.get_errno()
                os.close(fd)
                raise OSError(err, os.strerror(err))
            self._fd = fd
        except (OSError, AttributeError) as exc:
            log.warning(
                "inotify unavailable (%s); polling the spool every %.1fs", exc, FALLBACK_POLL
            )

    @property
    def uses_inotify(self) -> bool:
        return self._fd >= 0

    def fileno(self) -> int:
        """The inotify descriptor, readable when the spool changed (-1 without inotify)."""
        return self._fd

    def wake_fileno(self) -> int:
        """Readable after :meth:`wake`."""
        return self._wake_r

    def consume_changes(self) -> None:
        # The records themselves do not matter: the forwarder rescans the directory.
        if self._fd >= 0:
            _drain(self._fd)

    def consume_wake(self) -> None:
        _drain(self._wake_r)

    def wake(self) -> None:
        """Make :meth:`wake_fileno` readable, so the forwarder's loop wakes at once
        rather than at its next tick. Safe in a signal handler."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass
