"""The followers run beside the forwarder on a thread of their own: every follower is
polled until stopped, a failure is reported (never raised into the thread), and stopping
closes each follower so its position is saved."""

from __future__ import annotations

import threading
from typing import Any

from producer.followers import Followers
from shared.errors import SpoolError
from tests.waiting import wait_until


class FakeFollower:
    def __init__(self, fail_first: int = 0):
        self.polls = 0
        self.closed = False
        self.fail_first = fail_first
        self.config: Any = type("C", (), {"path": "/var/log/x"})()

    def poll(self) -> int:
        self.polls += 1
        if self.polls <= self.fail_first:
            raise SpoolError("spool is full")
        return 0

    def close(self) -> None:
        self.closed = True


def test_followers_are_polled_until_stopped_and_failures_are_reported() -> None:
    good, failing = FakeFollower(), FakeFollower(fail_first=2)
    errors: list[str] = []
    lock = threading.Lock()

    def on_error(why: str) -> None:
        with lock:
            errors.append(why)

    running = Followers([good, failing], on_error, interval=0.01)  # type: ignore[list-item]
    running.start()
    wait_until(lambda: good.polls >= 5 and failing.polls >= 5, 10, "several polls")
    running.stop()
    assert errors == ["log follower /var/log/x: spool is full"] * 2
    assert good.closed and failing.closed
    assert not running._thread.is_alive()  # stopped: nothing polls after stop() returned
