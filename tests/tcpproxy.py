"""A TCP proxy between a client and the shared broker (or a relay), so a test can misbehave
the network for one client without touching what everyone else uses: :meth:`TcpProxy.cut`
drops every connection at once, as a failing network does; :meth:`TcpProxy.mute` stops
passing the upstream's bytes but keeps every socket open, as a broker in a minority
partition or a stuck quorum leader does; :meth:`TcpProxy.drop` also swallows what the
client sends, as a link whose packets vanish does. It also keeps what the client sent, one
entry per ``recv``, so a test can see which commands travelled together."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class TcpProxy:
    def __init__(self, upstream: tuple[str, int], port: int = 0):
        """``port``: a fixed one, such as that of a proxy closed earlier (back again)."""
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._muted = threading.Event()
        self._dropping = threading.Event()
        self._closed = threading.Event()
        self.accepted = 0
        self.sent: list[bytes] = []  # client to upstream, chunk by chunk
        self.dropped: list[bytes] = []  # what the client sent while dropping
        self._trip: Callable[[bytes], bool] | None = None
        self.tripped = threading.Event()
        threading.Thread(target=self._accept, name="tcpproxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
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
            # Chunks go on as they came, at once: with Nagle's algorithm a reply split over
            # two recvs waits for the peer's delayed ACK (40 ms), each round trip.
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.accepted += 1
                self._open += [client, server]
            for source, sink, upstream in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, sink, upstream), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if upstream and self._muted.is_set():
                    self._closed.wait()  # silent, sockets open, until the test ends
                    return
                if not upstream:
                    if self._trip is not None and self._trip(data):
                        # Before passing it on: the upstream's answer to it must not
                        # reach the client.
                        self._muted.set()
                        self._trip = None
                        self.tripped.set()
                    with self._lock:
                        if self._dropping.is_set():
                            self.dropped.append(data)
                            continue
                        self.sent.append(data)
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def mute(self) -> None:
        """Stop passing the upstream's bytes to clients, keeping the connections up."""
        self._muted.set()

    def mute_when(self, trip: Callable[[bytes], bool]) -> None:
        """:meth:`mute` just before passing on the first chunk the client sends for which
        ``trip`` (called with each chunk in turn) is true; :attr:`tripped` is set then. The
        client is frozen at an exact point of its conversation, whatever the timing."""
        self._trip = trip

    def drop(self) -> None:
        """Swallow what clients send from now on (kept in :attr:`dropped`), keeping the
        connections up: the client's writes succeed and never arrive."""
        self._dropping.set()

    def restore(self) -> None:
        """Pass bytes both ways again, for connections made from now on (a muted
        connection stays muted: cut it)."""
        self._muted.clear()
        self._dropping.clear()

    def cut(self) -> None:
        """Drop every connection through the proxy at once; new ones are still accepted."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed.set()
        # A close alone leaves a listener that a thread is blocked accepting on in
        # LISTEN: connections would queue and hang instead of being refused.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut()
