"""The benchmarks' relay: aiosmtpd with STARTTLS (trustme certificate), in a process of its
own so that it never shares a GIL with what it measures. It records when each mail
arrived, its event id (from the Message-ID) and how many events it covers (a digest's
subject says), with an optional delay before each DATA
reply to play a slow cloud relay, and optionally offering PIPELINING (aiosmtpd does not by
itself; it answers commands in the order it reads them, which is all RFC 2920 asks)."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

_MESSAGE_ID = re.compile(rb"^Message-ID: <([^@>]+)@", re.MULTILINE | re.IGNORECASE)
# A digest's subject says how many events it covers: "[storm] CLUSTER: N events in W s".
_DIGEST_EVENTS = re.compile(rb"^Subject: \[storm\] [^\r\n]*?: (\d+) events in ", re.MULTILINE)


@dataclass
class Arrival:
    event_id: str
    at: float  # time.time() when DATA completed
    events: int = 1  # events the mail covers: more than one for a digest


class _Handler:
    def __init__(self, delay: float, out: Connection, pipelining: bool):
        self.delay = delay
        self.out = out
        self.pipelining = pipelining

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # with this hook, aiosmtpd leaves it to us
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        content = envelope.original_content or b""
        match = _MESSAGE_ID.search(content)
        digest = _DIGEST_EVENTS.search(content)
        self.out.send(
            (
                match.group(1).decode() if match else "",
                time.time(),
                int(digest.group(1)) if digest else 1,
            )
        )
        return "250 OK"


def _serve(
    port: int, cert: str, key: str, delay: float, out: Connection, *, pipelining: bool
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler = _Handler(delay, out, pipelining)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(
                handler, hostname="bench.relay", tls_context=context, require_starttls=True
            ),
            "127.0.0.1",
            port,
            reuse_address=True,
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def wait_listening(port: int, what: str, timeout: float = 10.0) -> None:
    """Wait until a process just started accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not start")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class BenchRelay:
    """Start with ``with BenchRelay(certdir, delay) as relay``; ``arrivals()`` drains what
    arrived so far."""

    def __init__(self, certdir: Path, delay: float = 0.0, *, pipelining: bool = False):
        self.port = free_port()
        self._recv, send = multiprocessing.Pipe(duplex=False)
        self._proc = multiprocessing.Process(
            target=_serve,
            args=(
                self.port,
                str(certdir / "cert.pem"),
                str(certdir / "key.pem"),
                delay,
                send,
            ),
            kwargs={"pipelining": pipelining},
            daemon=True,
        )
        self._arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        # Drain the pipe all the time: a full pipe would block the relay's event loop and
        # show up as latency that is not ours.
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while True:
            try:
                event_id, at, events = self._recv.recv()
            except (EOFError, OSError):
                return
            with self._more:
                self._arrivals.append(Arrival(event_id, at, events))
                self._more.notify_all()

    def __enter__(self) -> BenchRelay:
        self._proc.start()
        self._reader.start()
        wait_listening(self.port, "bench relay")
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.join(5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def wait_for_events(self, count: int, timeout: float) -> list[Arrival]:
        """Wait until the mails so far cover ``count`` events (a digest covers many)."""
        with self._more:
            if not self._more.wait_for(
                lambda: sum(a.events for a in self._arrivals) >= count, timeout
            ):
                covered = sum(a.events for a in self._arrivals)
                raise RuntimeError(f"only {covered} of {count} events were mailed")
            return list(self._arrivals)

    def wait_for(self, count: int, timeout: float) -> list[Arrival]:
        with self._more:
            if not self._more.wait_for(lambda: len(self._arrivals) >= count, timeout):
                raise RuntimeError(f"only {len(self._arrivals)} of {count} mails arrived")
            return list(self._arrivals)


def make_certs(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1; returns the CA file."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return directory / "ca.pem"
