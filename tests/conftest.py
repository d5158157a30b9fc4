"""Shared fixtures: trustme certificates, a fresh RabbitMQ vhost per test, real SMTP
servers, and real worker/producer processes started the way the README says."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.data import vendor_list_path
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until

BIN = Path(sys.executable).parent
RABBIT_HOST = os.environ.get("CLUSTERALERT_TEST_RABBIT_HOST", "127.0.0.1")
RABBIT_PORT = int(os.environ.get("CLUSTERALERT_TEST_RABBIT_PORT", "5672"))

# The vendor's full published list is not ours to ship. Its tests are collected only when
# CLUSTERALERT_VENDOR_LIST names a copy, so a clone of the repository alone has nothing to
# skip; the same rules run on every clone against our own fixture.
collect_ignore = [] if vendor_list_path() else ["test_vendor_published.py"]

# A skipped test fails the run (see tests/skip_policy.py).
pytest_plugins = ["tests.skip_policy"]


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path

    def server_context(self, *names: str, ca: trustme.CA | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (ca or self.ca).issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
        return context


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, ca_file)


@pytest.fixture
def smtp_server(certs: Certs) -> Iterator[Callable[..., SmtpServer]]:
    """Factory: ``smtp_server("starttls", credentials=("u", "p"))``."""
    started: list[SmtpServer] = []

    def start(
        mode: str = "starttls",
        *,
        credentials: tuple[str, str] | None = None,
        context: ssl.SSLContext | str | None = "default",
    ) -> SmtpServer:
        tls = certs.server_context() if context == "default" else context
        server = SmtpServer(mode, tls, credentials).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def rabbit() -> None:
    """The real broker must be there: CI has one, so its absence is a failure."""
    try:
        socket.create_connection((RABBIT_HOST, RABBIT_PORT), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not reachable on {RABBIT_HOST}:{RABBIT_PORT}: {exc}")
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create an isolated vhost per test")


@pytest.fixture
def vhost(rabbit: None) -> Iterator[str]:
    """A vhost of its own for each test, deleted afterwards, so runs never see each
    other's queues and the suite passes twice in a row on one broker."""
    name = f"clusteralert-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    _rabbitmqctl("delete_vhost", name)


def amqp_url(vhost: str, password: bool = True) -> str:
    secret = ":guest" if password else ""
    return f"amqp://guest{secret}@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """A console script run as a real process, with its output kept for the report."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        bin_dir: Path = BIN,
    ):
        self.name = name
        self.log = log
        self.killed = False
        self.hung = False
        self.expected_exit = 0
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            [str(bin_dir / name), *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL on purpose: teardown then accepts whatever exit code it left."""
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code; a process that outlives ``timeout`` is killed and
        marked as hung, which fails the test at teardown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.hung = True
            self.proc.kill()
            code = self.proc.wait(10)
        if not self._fh.closed:
            self._fh.close()
        return code


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Factory for real processes. Every process a test did not kill on purpose
    (``Process.kill``) must exit with ``expected_exit`` (0 unless the test says otherwise)
    within its grace period, or the test fails at teardown: a worker that crashes or hangs
    at shutdown must not go unnoticed."""
    started: list[Process] = []

    def start(
        name: str, *args: str, env: dict[str, str] | None = None, bin_dir: Path = BIN
    ) -> Process:
        process = Process(name, list(args), tmp_path / f"{name}-{len(started)}.log", env, bin_dir)
        started.append(process)
        return process

    yield start
    problems = []
    for process in started:
        code = process.stop()
        if process.killed:
            continue
        if process.hung:
            problems.append(f"{process.name} did not exit within its grace period")
        elif code != process.expected_exit:
            problems.append(
                f"{process.name} exited {code} (expected {process.expected_exit}); "
                f"log {process.log}:\n{process.output()[-2000:]}"
            )
    if problems:
        pytest.fail("\n".join(problems))


def scrape(port: int) -> dict[str, float]:
    """``{'name{label="v"}': value}`` from a /metrics endpoint, or {} if it is down."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_metric(port: int, name: str, predicate: Callable[[float], bool], timeout: float) -> float:
    def probe() -> float | None:
        value = scrape(port).get(name)
        return value if value is not None and predicate(value) else None

    result = wait_until(lambda: probe() is not None, timeout, f"{name} on :{port}")
    assert result
    return scrape(port)[name]
