"""A TCP proxy between a client and the shared broker, so a test can cut a client's
connection without touching the broker everyone else uses. It also keeps what the client
sent, one entry per ``recv``, so a test can see which commands travelled together."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.accepted = 0
        self.sent: list[bytes] = []  # client to upstream, chunk by chunk
        threading.Thread(target=self._accept, name="tcpproxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._open += [client, server]
            threading.Thread(target=_pump, args=(client, server, self._record), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client), daemon=True).start()

    def _record(self, chunk: bytes) -> None:
        with self._lock:
            self.sent.append(chunk)

    def cut(self) -> None:
        """Drop every connection through the proxy at once, as a failing network would;
        new connections are still accepted."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


def _pump(
    source: socket.socket, sink: socket.socket, record: Callable[[bytes], None] | None = None
) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            if record:
                record(data)
            sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
