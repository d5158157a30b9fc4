"""Prometheus metrics of the worker (README, "Metrics").

Everything lives in an injectable registry, so tests build a fresh one. Every label value
is created at zero up front, so dashboards and alert rules see 0 rather than no series.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import assert_never

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.errors import FAILURE_REASONS, TLS_CAUSES
from shared.filter import FILTER_REASONS
from worker.outcome import Acked, DeadLetter, Outcome, Retry

__all__ = ["Metrics"]

_SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_EVENT_TO_MAIL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self, relays: Iterable[str], registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "clusteralert_events_consumed",
            "Events taken in, each counted where it ends: filtered, folded or refused by the "
            "incident stage, or in a notification the delivery stage takes",
            registry=r,
        )
        self.filtered = Counter(
            "clusteralert_events_filtered", "Events acked without mail", ["reason"], registry=r
        )
        self.sent = Counter(
            "clusteralert_mails_sent", "Mails a relay accepted", ["relay"], registry=r
        )
        self.failed = Counter(
            "clusteralert_mails_failed",
            "Failed delivery attempts (each attempt that got no 250)",
            ["reason"],
            registry=r,
        )
        self.tls_refused = Counter(
            "clusteralert_tls_refused", "Refusals to continue without TLS", ["cause"], registry=r
        )
        self.retries = Counter("clusteralert_retries", "Retries scheduled", ["stage"], registry=r)
        self.dead_lettered = Counter(
            "clusteralert_dead_lettered",
            "Alerts given up and moved to the DLQ",
            ["reason"],
            registry=r,
        )
        self.unknown = Counter(
            "clusteralert_events_unknown",
            "Events whose module:event_id is not in the catalog (mailed or not)",
            registry=r,
        )
        self.replayed = Counter("clusteralert_replayed", "DLQ messages re-published", registry=r)
        self.recipients_refused = Counter(
            "clusteralert_recipients_refused", "RCPT refusals inside accepted mails", registry=r
        )
        self.in_flight = Gauge("clusteralert_in_flight", "Messages being delivered", registry=r)
        self.broker_connected = Gauge(
            "clusteralert_broker_connected", "1 when connected to RabbitMQ", registry=r
        )
        self.send_duration = Histogram(
            "clusteralert_send_duration_seconds",
            "One SMTP transaction",
            ["relay"],
            buckets=_SEND_BUCKETS,
            registry=r,
        )
        self.event_to_mail = Histogram(
            "clusteralert_event_to_mail_seconds",
            "Event time to relay acceptance",
            buckets=_EVENT_TO_MAIL_BUCKETS,
            registry=r,
        )
        # 0 until the relay's first TLS handshake (and for plaintext relays); the alert
        # rule and the dashboard skip 0.
        self.cert_expiry = Gauge(
            "clusteralert_relay_cert_expiry_timestamp_seconds",
            "notAfter of the certificate the relay showed at the last TLS handshake",
            ["relay"],
            registry=r,
        )
        # The incident stage (README, "Incidents").
        self.incidents_opened = Counter(
            "clusteralert_incidents_opened", "New incidents mailed or digested", registry=r
        )
        self.folded = Counter(
            "clusteralert_events_folded",
            "Events merged into an incident (duplicate) or folded after its mail (repeat)",
            ["reason"],
            registry=r,
        )
        self.silenced = Counter(
            "clusteralert_events_silenced",
            "Events a silence held back (acked once their count is recorded)",
            registry=r,
        )
        self.silences_active = Gauge(
            "clusteralert_silences_active",
            "Silences in force that this worker has read from the stream",
            registry=r,
        )
        self.digests = Counter("clusteralert_digests_sent", "Storm digests published", registry=r)
        self.recoveries = Counter(
            "clusteralert_recoveries", "Incidents ended by a resolving event", registry=r
        )
        self.stage_active = Gauge(
            "clusteralert_incident_stage_active",
            "1 on the worker whose stage is active",
            registry=r,
        )
        self.held = Gauge(
            "clusteralert_incident_held", "Events the stage holds unacked", registry=r
        )
        self.next_due = Gauge(
            "clusteralert_incident_next_due_timestamp_seconds",
            "When the stage next sends what it holds (Unix time; 0 when it holds nothing)",
            registry=r,
        )
        # Watching the pipeline itself (README, "Watching the pipeline itself"): 0 until
        # the first canary this worker got accepted; alert rules take the max over workers.
        self.canary_success = Gauge(
            "clusteralert_canary_last_success_timestamp_seconds",
            "When a relay last accepted a canary mail from this worker (Unix time)",
            registry=r,
        )
        self.canary_interval = Gauge(
            "clusteralert_canary_interval_seconds",
            "[canary] interval of this worker (0: no canary)",
            registry=r,
        )
        self.canaries_published = Counter(
            "clusteralert_canaries_published",
            "Canary events the active incident stage published",
            registry=r,
        )
        self.node_last_seen = Gauge(
            "clusteralert_node_last_seen_timestamp_seconds",
            "Time of the last heartbeat of a node agent that this worker's stage took in",
            ["cluster", "node"],
            registry=r,
        )
        self.node_heartbeat_interval = Gauge(
            "clusteralert_node_heartbeat_interval_seconds",
            "The heartbeat interval the node agent announced in its last heartbeat",
            ["cluster", "node"],
            registry=r,
        )
        for fold in ("duplicate", "repeat"):
            self.folded.labels(fold)
        for filter_reason in FILTER_REASONS:
            self.filtered.labels(filter_reason)
        for reason in FAILURE_REASONS:
            self.failed.labels(reason)
            self.dead_lettered.labels(reason)
        for cause in TLS_CAUSES:
            self.tls_refused.labels(cause)
        for stage in ("inprocess", "delayed"):
            self.retries.labels(stage)
        for relay in relays:
            self.sent.labels(relay)
            self.send_duration.labels(relay)
            self.cert_expiry.labels(relay)

    def settled(self, outcome: Outcome) -> None:
        """Count an outcome the broker has taken (confirmed, then acked)."""
        match outcome:
            case Acked():
                pass
            case Retry():
                self.retries.labels("delayed").inc()
            case DeadLetter(reason=reason):
                self.dead_lettered.labels(reason).inc()
            case _:
                assert_never(outcome)
