"""Wake the forwarder when a file lands in the spool, within milliseconds.

Linux inotify through ctypes, so the node agent needs no extra package. Where inotify is
unavailable (another OS, or a watch limit reached), it degrades to a short poll and says
so once in the log, rather than failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
from pathlib import Path
from typing import Final

__all__ = ["SpoolWatcher"]

log = logging.getLogger(__name__)

_IN_CLOSE_WRITE: Final = 0x00000008
_IN_MOVED_TO: Final = 0x00000080
_IN_NONBLOCK: Final = 0o4000
_IN_CLOEXEC: Final = 0o2000000
_FALLBACK_POLL: Final = 0.2


class SpoolWatcher:
    def __init__(self, directory: Path):
        self._fd = -1
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
                "inotify unavailable (%s); polling the spool every %.1fs", exc, _FALLBACK_POLL
            )

    def wait(self, timeout: float) -> bool:
        """Block until the spool changes or ``timeout`` passes. True if it changed (a
        poll fallback always says it may have)."""
        if self._fd < 0:
            select.select([], [], [], min(timeout, _FALLBACK_POLL))
            return True
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        # Drain the event records; the forwarder rescans the directory anyway.
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
