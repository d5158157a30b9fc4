"""Deliveries from the thread that owns the broker connection to the asyncio loop that
sends mail, and their outcomes back, a batch at a time.

Each crossing between the two threads costs a wake-up of the other thread and a handover
of the interpreter lock. One per delivery each way (``run_coroutine_threadsafe``, then a
wake-up per finished mail) was about a tenth of the worker's CPU in a storm; a drain's
deliveries now cross in one call, and the finished mails of one owner-thread pass share
one wake-up.

Every :class:`Job` is created, started, cancelled and read on a fixed thread: the owner
thread submits and reads; the loop thread starts, cancels and finishes. Cancelling runs
on the loop thread, after the start of the same job (both are queued there in order), so
an abandoned job's task always exists to be cancelled, and one cancelled before its first
step never runs at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from worker.broker import Delivery
from worker.outcome import Outcome

__all__ = ["Handoff", "Job"]

Start = Callable[[Delivery], Coroutine[Any, Any, Outcome]]


class Job:
    """One delivery on its way through the pipeline."""

    __slots__ = ("delivery", "task")

    def __init__(self, delivery: Delivery):
        self.delivery = delivery
        self.task: asyncio.Task[Outcome] | None = None  # set on the loop thread

    def outcome(self) -> Outcome | None:
        """The pipeline's outcome; None when it was cancelled. Raises what the pipeline
        raised. Only for a job :meth:`Handoff.finished` returned."""
        assert self.task is not None
        if self.task.cancelled():
            return None
        return self.task.result()


class Handoff:
    def __init__(self, loop: asyncio.AbstractEventLoop, start: Start):
        self.loop = loop
        self._start = start
        self._queued: list[Job] = []  # owner thread: submitted, not yet sent over
        self._done: queue.SimpleQueue[Job] = queue.SimpleQueue()
        # Set by the loop thread when it writes a wake-up, cleared by the owner thread
        # before it takes what finished: a mail finishing after that clear writes again.
        self._woken = False
        # The owner thread waits on the broker's socket and on ``wake``: a finished mail
        # ends that wait at once, since an ack held back holds back the next delivery of
        # a full prefetch window.
        self.wake, self._wake_writer = socket.socketpair()
        self.wake.setblocking(False)
        self._wake_writer.setblocking(False)

    def submit(self, delivery: Delivery) -> Job:
        """Owner thread: queue ``delivery`` for the next :meth:`flush`."""
        job = Job(delivery)
        self._queued.append(job)
        return job

    def flush(self) -> None:
        """Owner thread: start every queued job on the loop, in one crossing."""
        if self._queued:
            batch, self._queued = self._queued, []
            self.loop.call_soon_threadsafe(self._begin, batch)

    def finished(self) -> list[Job]:
        """Owner thread: the jobs finished since the last call, oldest first."""
        self._woken = False
        done: list[Job] = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def abandon(self, jobs: list[Job]) -> None:
        """Owner thread: stop ``jobs``. Those not yet flushed are dropped unstarted; the
        others are cancelled on the loop."""
        unsent = set(self._queued)
        self._queued.clear()
        started = [job for job in jobs if job not in unsent]
        if started:
            self.loop.call_soon_threadsafe(self._cancel, started)

    def close(self) -> None:
        """A mail finishing after this writes to a closed socket, which is ignored."""
        self.wake.close()
        self._wake_writer.close()

    def _begin(self, batch: list[Job]) -> None:
        for job in batch:
            task = self.loop.create_task(self._start(job.delivery))
            job.task = task
            task.add_done_callback(functools.partial(self._finish, job))

    def _finish(self, job: Job, _task: object) -> None:
        self._done.put(job)
        if not self._woken:
            self._woken = True
            # Full means wake-ups are waiting already: one more adds nothing. Closed
            # means the consumer has stopped, and nobody waits.
            with contextlib.suppress(OSError):
                self._wake_writer.send(b"\0")

    def _cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.task is not None:  # always: its batch's _begin ran first
                job.task.cancel()
