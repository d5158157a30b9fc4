"""The node agent's optional metrics endpoint (``[producer] metrics_port``).

A few gauges in the Prometheus text format, served by the standard library: the producer
must stay light, so it does not pull in prometheus-client for them."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from shared.errors import ClusteralertError

if TYPE_CHECKING:
    from producer.forward import Forwarder

__all__ = ["render_metrics", "serve_metrics"]


def render_metrics(forwarder: Forwarder) -> str:
    stats = forwarder.spool.stats()
    age = (time.time_ns() - stats.oldest_ns) / 1e9 if stats.oldest_ns else 0.0
    rows = [
        ("clusteralert_spool_events", "gauge", "Events waiting in the spool", stats.events),
        ("clusteralert_spool_bytes", "gauge", "Bytes waiting in the spool", stats.bytes),
        (
            "clusteralert_spool_oldest_age_seconds",
            "gauge",
            "Age of the oldest event waiting (0 when empty)",
            round(age, 3),
        ),
        (
            "clusteralert_producer_published_total",
            "counter",
            "Events the broker confirmed",
            forwarder.published,
        ),
        (
            "clusteralert_producer_held_back_total",
            "counter",
            "Times publishing paused (unroutable, refused, no exchange)",
            forwarder.held_back,
        ),
        (
            "clusteralert_producer_set_aside_total",
            "counter",
            "Spool files set aside unsent (invalid, unreadable, a link, too large)",
            forwarder.set_aside,
        ),
        (
            "clusteralert_producer_broker_connected",
            "gauge",
            "1 when connected",
            int(forwarder.connected),
        ),
    ]
    lines = []
    for name, kind, text, value in rows:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def serve_metrics(port: int, forwarder: Forwarder) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render_metrics(forwarder).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the log

    try:
        server = ThreadingHTTPServer(("", port), Handler)
    except OSError as exc:
        raise ClusteralertError(f"cannot serve metrics on port {port}: {exc.strerror}") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
