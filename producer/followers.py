"""The node agent's log followers, run beside the forwarder rather than inside it.

A follower is a source like ``emit``: it turns lines into events in the spool, and the
forwarder forwards whatever lands there (it notices new files at once). Running the
followers on a thread of their own means a slow disk or a long line never holds up
publishing, confirms or heartbeats on the forwarder's I/O loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Final

from producer.follow import LogFollower
from shared.errors import ClusteralertError

__all__ = ["FOLLOW_INTERVAL", "Followers"]

FOLLOW_INTERVAL: Final = 0.25  # how often the followers look for new lines

log = logging.getLogger(__name__)


class Followers:
    """Polls every follower each ``interval`` until :meth:`stop`. A failure (a full
    spool) is reported through ``on_error``; the line is read again next time, so nothing
    is skipped."""

    def __init__(
        self,
        followers: Sequence[LogFollower],
        on_error: Callable[[str], None],
        interval: float = FOLLOW_INTERVAL,
    ):
        self.followers = list(followers)
        self._on_error = on_error
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-followers", daemon=True)

    def start(self) -> None:
        if self.followers:
            self._thread.start()

    def stop(self) -> None:
        """Stop polling and close the followers (which saves their positions)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for follower in self.followers:
            follower.close()

    def _run(self) -> None:
        while True:
            for follower in self.followers:
                try:
                    follower.poll()
                except (ClusteralertError, OSError) as exc:
                    self._on_error(f"log follower {follower.config.path}: {exc}")
            if self._stop.wait(self._interval):
                return
