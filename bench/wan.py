"""A relay across a simulated WAN: a TCP proxy, in a process of its own, that holds every
chunk for a fixed one-way delay in each direction (order kept), so each round trip costs
twice that. ``tc netem`` would do the same in the kernel, but this kernel has no
sch_netem."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing

from bench.relay import free_port, wait_listening


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(forward())
    with contextlib.suppress(OSError):  # a reset ends the stream like an EOF
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
    queue.put_nowait((loop.time() + delay, b""))
    with contextlib.suppress(OSError):
        await sender


def _serve(port: int, upstream: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(_carry(reader, up_writer, delay), _carry(up_reader, writer, delay))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Wan:
    """``with Wan(relay_port, one_way=0.0125) as wan``: connect to ``wan.port``."""

    def __init__(self, upstream: int, one_way: float):
        self.port = free_port()
        self._proc = multiprocessing.Process(
            target=_serve, args=(self.port, upstream, one_way), daemon=True
        )

    def __enter__(self) -> Wan:
        self._proc.start()
        wait_listening(self.port, "WAN proxy")
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.join(5)
