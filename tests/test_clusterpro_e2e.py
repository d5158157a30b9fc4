"""A CLUSTERPRO node out of the box: the default log follower and the shipped catalog turn
its syslog lines into mails with named params, through the real agent, RabbitMQ, worker
and a TLS relay."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Certs, Process
from tests.pipeline import start_worker, write_config
from tests.smtpserver import SmtpServer
from tests.test_follow import append, syslog
from tests.waiting import wait_until


@pytest.mark.integration
def test_clusterpro_monitor_error_and_server_stop_are_mailed_with_named_params(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", "relay-secret-7f3a"))
    log = tmp_path / "messages"
    log.write_text("")
    # Nothing but the follower's path: default pattern, shipped catalog, default filter.
    config = write_config(
        tmp_path, vhost, [relay], certs, extra=f'[[producer.follow]]\npath = "{log}"\n'
    )
    start_worker(processes, config)
    agent = processes("clusteralert-producer", "run", "--config", str(config))
    wait_until(lambda: any((tmp_path / "spool" / ".follow").glob("*.json")), 30, "the follower")
    append(
        log,
        syslog("<type: rm><event: 9> Detected an error in monitoring httpw. (11 : timeout)"),
        syslog("<type: rm><event: 1> Monitoring httpw has started."),  # info, not mailed
        syslog("<type: nm><event: 2> Server server2 has been stopped."),
    )
    assert relay.wait_for(lambda received: len(received) >= 2, 60), agent.output()
    subjects = sorted(str(mail.parsed()["Subject"]) for mail in relay.received)
    assert subjects == [
        "[error] prod-cluster server1: Monitor httpw on server1 found an error: timeout (code 11).",
        "[info] prod-cluster server1: Server server2 left the cluster.",
    ]
    body = next(m for m in relay.received if b"httpw" in m.data).parsed().get_content()
    assert "Check the service httpw watches on server1" in body
    assert all(mail.tls for mail in relay.received)
