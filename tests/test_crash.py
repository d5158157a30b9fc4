"""A bug in the worker takes the same failure path as every other failure (unit level):
dead-lettered with the full ``x-clusteralert-*`` headers and reason ``crash``, counted
under that reason, which exists at zero from the start."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from shared.catalog import load_catalog
from shared.config import FilterConfig, MailConfig
from shared.event import encode_event, new_event
from worker.metrics import Metrics
from worker.outcome import DeadLetter
from worker.pipeline import Pipeline
from worker.render import Mail, Renderer
from worker.retry_policy import (
    HEADER_ATTEMPTS,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_ERROR,
    HEADER_LAST_FAILURE,
    HEADER_REASON,
    HEADER_WORKER,
)
from worker.send import Sent

BODY = encode_event(
    new_event(module="node", event_id=1, cluster="c", node="n", source="t", params={})
)


class BuggySender:
    """Stands in for a sender with a bug: not a DeliveryError, just an exception."""

    async def send(self, mail: Mail) -> Sent:
        raise ZeroDivisionError("division by zero, pw=pw")


def make() -> tuple[Pipeline, Metrics]:
    metrics = Metrics([])
    pipeline = Pipeline(
        load_catalog([]),
        FilterConfig(),
        Renderer(MailConfig(sender="c@example.com", to=("o@example.com",))),
        BuggySender(),  # type: ignore[arg-type]
        metrics,
        retry_window=timedelta(minutes=10),
        worker_name="w1",
        scrub=lambda t: t.replace("pw", "**"),
    )
    return pipeline, metrics


def test_crash_is_a_reason_at_zero_from_the_start() -> None:
    get = Metrics([]).registry.get_sample_value
    assert get("clusteralert_mails_failed_total", {"reason": "crash"}) == 0
    assert get("clusteralert_dead_lettered_total", {"reason": "crash"}) == 0


def test_a_worker_bug_is_dead_lettered_with_full_headers_as_crash() -> None:
    pipeline, metrics = make()
    outcome = asyncio.run(pipeline.handle(BODY, {"custom": "kept"}))
    assert isinstance(outcome, DeadLetter) and outcome.reason == "crash"
    headers = outcome.headers
    assert headers[HEADER_REASON] == "crash"
    assert headers[HEADER_ATTEMPTS] == 1
    assert headers[HEADER_WORKER] == "w1"
    assert headers[HEADER_FIRST_FAILURE] == headers[HEADER_LAST_FAILURE]
    # The bug's type and text, with secrets scrubbed like any other failure's.
    assert headers[HEADER_LAST_ERROR] == "ZeroDivisionError: division by zero, **=**"
    assert headers["custom"] == "kept"
    get = metrics.registry.get_sample_value
    assert get("clusteralert_mails_failed_total", {"reason": "crash"}) == 1
    assert get("clusteralert_mails_failed_total", {"reason": "render"}) == 0
    assert get("clusteralert_in_flight") == 0
