"""A TCP proxy between a client and the shared broker, so a test can misbehave the network
for one client without touching the broker everyone else uses: :meth:`TcpProxy.cut` drops
every connection at once, as a failing network does; :meth:`TcpProxy.mute` stops passing
the broker's bytes but keeps every socket open, as a broker in a minority partition or a
stuck quorum leader does."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._muted = threading.Event()
        self._closed = threading.Event()
        self.accepted = 0
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
            with self._lock:
                self.accepted += 1
                self._open += [client, server]
            for source, sink, from_broker in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, sink, from_broker), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_broker: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_broker and self._muted.is_set():
                    self._closed.wait()  # silent, sockets open, until the test ends
                    return
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def mute(self) -> None:
        """Stop passing the broker's bytes to clients, keeping the connections up."""
        self._muted.set()

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
        self._listener.close()
        self.cut()
