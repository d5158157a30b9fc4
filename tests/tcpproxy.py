"""A TCP proxy for tests, between a client and the real RabbitMQ, that can go silent:
on :meth:`TcpProxy.mute` it stops passing bytes from the broker to the client but keeps
every socket open, as a broker in a minority partition or a stuck quorum leader does."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._muted = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def mute(self) -> None:
        """Stop passing the broker's bytes to clients, keeping the connections up."""
        self._muted.set()

    def close(self) -> None:
        self._closed.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_broker: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_broker and self._muted.is_set():
                    self._closed.wait()  # silent, sockets open, until the test ends
                    return
                sink.sendall(data)
