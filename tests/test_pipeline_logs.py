"""One log line per outcome, at unit level, word for word: the operator follows an alert
through the logs by its id, so what each line says is part of the contract (the worker
process test checks the same through ``--log-format json``)."""

from __future__ import annotations

import logging

import pytest

from shared.errors import PermanentError, TransientError
from shared.event import encode_event, new_event
from tests.test_pipeline import BODY, FakeSender, make, run
from worker.outcome import DeadLetter
from worker.retry_policy import HEADER_ATTEMPTS, HEADER_REPLAYED


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "worker.pipeline"]


def event_id() -> str:
    import json

    return str(json.loads(BODY)["id"])


def test_a_sent_mail_is_one_info_line_with_id_key_level_node_relay_and_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    pipeline, _ = make(FakeSender())
    run(pipeline, BODY, {HEADER_ATTEMPTS: 2})
    [(level, line)] = lines(caplog)
    assert level == logging.INFO
    assert line.startswith(
        f"sent event {event_id()} node:1 level error from n via relay:25, attempt 3, in "
    ), line


def test_a_filtered_event_is_one_info_line_with_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pipeline, _ = make(FakeSender())
    event = new_event(module="heartbeat", event_id=2, cluster="c", node="n", source="t")
    run(pipeline, encode_event(event))  # not mailed, says the shipped catalog
    [(level, line)] = lines(caplog)
    assert level == logging.INFO
    assert line.startswith(f"filtered event {event.id} heartbeat:2 from n: "), line
    assert line.endswith("catalog has mail off for heartbeat:2"), line


def test_an_unknown_event_that_is_mailed_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pipeline, metrics = make(FakeSender())
    body = encode_event(
        new_event(module="custom", event_id=9, cluster="c", node="n", source="t", level="error")
    )
    run(pipeline, body)
    found = lines(caplog)
    assert [line.split()[0] for _, line in found] == ["event", "sent"], found
    assert " custom:9 is not in the catalog: " in found[0][1]
    assert metrics.registry.get_sample_value("clusteralert_events_unknown_total") == 1


def test_a_retry_is_one_warning_with_rung_attempt_and_scrubbed_detail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    pipeline, _ = make(FakeSender(TransientError("timeout", "relay slow, pw leaked")))
    run(pipeline, BODY)
    [(level, line)] = lines(caplog)
    assert level == logging.WARNING
    assert line == (
        f"retry scheduled for event {event_id()} node:1 in 30s "
        "(attempt 1 failed: timeout: relay slow, ** leaked)"
    )


def test_a_dead_letter_is_one_error_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pipeline, _ = make(FakeSender(PermanentError("rejected_5xx", "550 no pw here")))
    run(pipeline, BODY)
    [(level, line)] = lines(caplog)
    assert level == logging.ERROR
    assert line == (
        f"dead-lettering event {event_id()} node:1 after 1 attempt(s): rejected_5xx: 550 no ** here"
    )


def test_an_undecodable_event_is_one_error_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pipeline, metrics = make(FakeSender())
    outcome = run(pipeline, b"{nope")
    assert isinstance(outcome, DeadLetter)
    assert str(outcome.headers["x-clusteralert-last-error"]).startswith("not JSON: ")
    assert (
        metrics.registry.get_sample_value(
            "clusteralert_mails_failed_total", {"reason": "invalid_event"}
        )
        == 1
    )
    [(level, line)] = lines(caplog)
    assert level == logging.ERROR
    assert line.startswith("dead-lettering undecodable event after 1 attempt(s): invalid_event: ")


@pytest.mark.parametrize(("attempts", "counted"), [(0, 1), (1, 0)])
def test_a_replay_is_counted_on_its_first_round_only(attempts: int, counted: int) -> None:
    # Separately: a total over both rounds would pass with the condition inverted.
    pipeline, metrics = make(FakeSender())
    run(pipeline, BODY, {HEADER_REPLAYED: "x", HEADER_ATTEMPTS: attempts})
    assert metrics.registry.get_sample_value("clusteralert_replayed_total") == counted
