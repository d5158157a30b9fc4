"""``amqps://`` for real: a TLS listener on the test broker with a certificate of its own
(trustme), a node agent and a worker that verify it, and both refusing a broker whose
certificate they do not trust. The listener is added to the running RabbitMQ for the test
and removed afterwards, so the broker everyone shares is left as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import RABBIT_HOST, Certs, Process, free_port, scrape
from tests.pipeline import SMTP_PASSWORD, emit, write_config
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@dataclass
class TlsListener:
    port: int
    ca_file: Path


def _eval(expression: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def amqps() -> Iterator[TlsListener]:
    """A TLS listener on a free port, with a certificate for 127.0.0.1 from a CA of its
    own, for the duration of one test."""
    ca = trustme.CA()
    # The broker runs as its own user: the files must be readable outside root's tmp.
    folder = Path(tempfile.mkdtemp(prefix="clusteralert-amqps-"))
    folder.chmod(0o755)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    for name in ("ca.pem", "cert.pem", "key.pem"):
        os.chmod(folder / name, 0o644)  # a throwaway test key
    port = free_port()
    options = (
        f'[{{cacertfile,"{folder}/ca.pem"}},{{certfile,"{folder}/cert.pem"}},'
        f'{{keyfile,"{folder}/key.pem"}},{{verify,verify_none}}]'
    )
    assert _eval(f"rabbit_networking:start_ssl_listener({port}, {options}, 1, 1).") == "ok"
    try:
        yield TlsListener(port, folder / "ca.pem")
    finally:
        _eval(f"rabbit_networking:stop_tcp_listener({port}).")
        shutil.rmtree(folder)


def over_tls(config: Path, vhost: str, listener: TlsListener, ca_file: Path) -> Path:
    """The test's config with the broker reached over TLS, trusting ``ca_file``."""
    text = config.read_text()
    start = text.index(f"amqp://guest@{RABBIT_HOST}:")
    end = text.index('"', start)
    text = text[:start] + f"amqps://guest@127.0.0.1:{listener.port}/{vhost}" + text[end:]
    text = text.replace("[broker]\n", f'[broker]\nca_file = "{ca_file}"\n', 1)
    out = config.with_name(f"amqps-{ca_file.stem}.toml")
    out.write_text(text)
    return out


def test_agent_and_worker_talk_to_rabbitmq_over_verified_tls(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    amqps: TlsListener,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = over_tls(write_config(tmp_path, vhost, [relay], certs), vhost, amqps, amqps.ca_file)
    port = free_port()
    processes("clusteralert-worker", "run", "--config", str(config), "--metrics-port", str(port))
    wait_until(
        lambda: scrape(port).get("clusteralert_broker_connected") == 1, 60, "worker over TLS"
    )
    processes("clusteralert-producer", "run", "--config", str(config))
    event_id = emit(config, "--module", "node", "--event-id", "1", "--param", "server=db1")
    assert relay.wait_for(lambda received: len(received) == 1, 60)
    assert relay.received[0].event_id == event_id
    connections = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "vhost", "ssl", "peer_port"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    # Both processes are connected to this test's vhost, and only over TLS.
    mine = [line.split() for line in connections.splitlines() if line.startswith(vhost)]
    assert len(mine) >= 2 and all(fields[1] == "true" for fields in mine), connections


def test_a_broker_certificate_from_another_ca_is_refused(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    amqps: TlsListener,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    # Trust the relay's CA for the broker too: the wrong one for this listener.
    config = over_tls(write_config(tmp_path, vhost, [relay], certs), vhost, amqps, certs.ca_file)
    port = free_port()
    worker = processes(
        "clusteralert-worker", "run", "--config", str(config), "--metrics-port", str(port)
    )
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in worker.output(), 60, "a refusal")
    assert scrape(port).get("clusteralert_broker_connected") == 0
    agent = processes("clusteralert-producer", "run", "--config", str(config))
    emit(config, "--module", "node", "--event-id", "1", "--param", "server=db1")
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in agent.output(), 60, "the agent's refusal")
    assert relay.received == []
