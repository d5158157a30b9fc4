"""Metrics exist from the start, at zero, for every label value dashboards rely on."""

from __future__ import annotations

from shared.errors import FAILURE_REASONS, TLS_CAUSES
from worker.metrics import Metrics


def test_every_label_value_starts_at_zero() -> None:
    metrics = Metrics(["smtp-a:587", "smtp-b:465"])
    get = metrics.registry.get_sample_value
    for reason in FAILURE_REASONS:
        assert get("clusteralert_mails_failed_total", {"reason": reason}) == 0
        assert get("clusteralert_dead_lettered_total", {"reason": reason}) == 0
    for cause in TLS_CAUSES:
        assert get("clusteralert_tls_refused_total", {"cause": cause}) == 0
    for reason in ("disabled", "catalog", "min_level", "unknown"):
        assert get("clusteralert_events_filtered_total", {"reason": reason}) == 0
    for relay in ("smtp-a:587", "smtp-b:465"):
        assert get("clusteralert_mails_sent_total", {"relay": relay}) == 0
        assert get("clusteralert_send_duration_seconds_count", {"relay": relay}) == 0
    for stage in ("inprocess", "delayed"):
        assert get("clusteralert_retries_total", {"stage": stage}) == 0
    for name in (
        "clusteralert_events_consumed_total",
        "clusteralert_events_unknown_total",
        "clusteralert_replayed_total",
        "clusteralert_recipients_refused_total",
        "clusteralert_in_flight",
        "clusteralert_broker_connected",
        "clusteralert_event_to_mail_seconds_count",
    ):
        assert get(name) == 0, name


def test_registries_are_independent() -> None:
    first, second = Metrics([]), Metrics([])
    first.consumed.inc()
    assert second.registry.get_sample_value("clusteralert_events_consumed_total") == 0
