"""The hand-off between the broker's thread and the mail loop: a batch crosses in one call,
finished jobs share a wake-up, and an abandoned job is never started or is cancelled.
A real asyncio loop; the deliveries are stand-ins (the hand-off never reads them)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, cast

import pytest

from tests.waiting import wait_until
from worker.broker import Delivery
from worker.handoff import Handoff
from worker.outcome import Acked, Outcome


class _Pipeline:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()

    def start(self, delivery: Delivery) -> Coroutine[Any, Any, Outcome]:
        return self._run(cast(str, delivery))

    async def _run(self, name: str) -> Outcome:
        self.started.append(name)  # a mail would be on its way from here on
        await self.release.wait()
        return Acked()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _running(loop: asyncio.AbstractEventLoop) -> threading.Thread:
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return thread


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_batch_starts_together_and_its_finished_jobs_share_one_wake_up(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pipeline = _Pipeline()
    handoff = Handoff(loop, pipeline.start)
    jobs = [handoff.submit(cast(Delivery, f"d{n}")) for n in range(3)]
    assert pipeline.started == []  # nothing crosses before the flush
    thread = _running(loop)
    try:
        handoff.flush()
        wait_until(lambda: len(pipeline.started) == 3, 10, "the batch started")
        loop.call_soon_threadsafe(pipeline.release.set)
        wait_until(lambda: handoff._done.qsize() == 3, 10, "all finished")
        assert handoff.finished() == jobs
        assert all(isinstance(job.outcome(), Acked) for job in jobs)
        # Three finished before the owner looked: one wake-up for them all.
        assert handoff.wake.recv(16) == b"\0"
    finally:
        _stop(loop, thread)
        handoff.close()


def test_a_job_abandoned_before_the_loop_reached_it_never_runs(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pipeline = _Pipeline()
    handoff = Handoff(loop, pipeline.start)
    job = handoff.submit(cast(Delivery, "d"))
    handoff.flush()  # queued on the loop, which is not running yet
    handoff.abandon([job])
    thread = _running(loop)
    try:
        done: list[object] = []
        wait_until(lambda: done.extend(handoff.finished()) or bool(done), 10, "the job ended")
        assert done == [job]
        assert job.outcome() is None
        assert pipeline.started == []
    finally:
        _stop(loop, thread)
        handoff.close()


def test_a_job_abandoned_while_running_is_cancelled(loop: asyncio.AbstractEventLoop) -> None:
    pipeline = _Pipeline()
    handoff = Handoff(loop, pipeline.start)
    job = handoff.submit(cast(Delivery, "d"))
    thread = _running(loop)
    try:
        handoff.flush()
        wait_until(lambda: pipeline.started == ["d"], 10, "the job started")
        handoff.abandon([job])
        done: list[object] = []
        wait_until(lambda: done.extend(handoff.finished()) or bool(done), 10, "the job ended")
        assert done == [job]
        assert job.outcome() is None  # cancelled: nothing to settle
    finally:
        _stop(loop, thread)
        handoff.close()


def test_abandon_drops_what_was_never_flushed(loop: asyncio.AbstractEventLoop) -> None:
    pipeline = _Pipeline()
    handoff = Handoff(loop, pipeline.start)
    job = handoff.submit(cast(Delivery, "d"))
    handoff.abandon([job])
    handoff.flush()
    thread = _running(loop)
    try:
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(10)
        assert pipeline.started == []
    finally:
        _stop(loop, thread)
        handoff.close()


def test_abandoning_started_and_unflushed_jobs_together_cancels_every_started_one(
    loop: asyncio.AbstractEventLoop,
) -> None:
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    pipeline = _Pipeline()
    handoff = Handoff(loop, pipeline.start)
    started = [handoff.submit(cast(Delivery, f"s{n}")) for n in range(3)]
    thread = _running(loop)
    try:
        handoff.flush()
        wait_until(lambda: len(pipeline.started) == 3, 10, "three jobs started")
        unflushed = handoff.submit(cast(Delivery, "u"))  # taken by a drain that then failed
        handoff.abandon([unflushed, *started])
        wait_until(lambda: handoff._done.qsize() == 3, 10, "the started jobs ended")
        done = handoff.finished()
        assert sorted(done, key=id) == sorted(started, key=id)
        assert all(job.outcome() is None for job in done)  # cancelled, none sent
        handoff.flush()
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(10)
        assert "u" not in pipeline.started
        assert errors == []
    finally:
        _stop(loop, thread)
        handoff.close()
