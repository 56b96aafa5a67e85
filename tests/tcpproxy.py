"""A loopback TCP proxy for the fault tests: forwards to one server, and can stall or delay the link.

`pause()` stops forwarding in both directions (a black-holed link: bytes pile up in the socket
buffers, nothing is lost and nothing arrives); `resume()` lets them through again. `delay` adds
that many seconds to every chunk in each direction (a slow link), keeping the order of the bytes.
It runs its own event loop in a daemon thread, so tests on any loop (or none) can use it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_CHUNK = 65536
_RECEIVE_BUFFER = 64 * 1024  # a black hole as a real one behaves: small kernel buffers, not 32 MiB


class TcpProxy:
    """Listens on 127.0.0.1 (a port chosen by the OS) and forwards each connection to `target_port`."""

    def __init__(self, target_port: int, delay: float = 0.0, port: int = 0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = port  # 0: chosen by the OS; another proxy's port: it comes back (a restart)
        self._flowing = threading.Event()
        self._flowing.set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._upstream_ports: set[int] = set()
        self._gate: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    def pause(self) -> None:
        """Stop forwarding: the link is black-holed until `resume()`."""
        self._call(lambda gate: gate.clear())

    def resume(self) -> None:
        self._call(lambda gate: gate.set())

    def stop(self) -> None:
        """Close the listener and every forwarded connection, and end the thread."""
        if not self._thread.is_alive():
            return
        with suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def upstream_ports(self) -> set[int]:
        """The local ports of the open connections to the target: what the target sees as the
        peer of a connection that came through this proxy."""

        async def read() -> set[int]:
            return set(self._upstream_ports)

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(5)

    def _call(self, change: object) -> None:
        async def apply() -> None:
            assert self._gate is not None
            change(self._gate)  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(apply(), self._loop).result(5)

    async def _listen(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before listen(), so accepted sockets inherit it and advertise a small window.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        self._server = await asyncio.start_server(self._serve, sock=listener)
        self.port = listener.getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client.close()
            return
        upstream_port = server.get_extra_info("sockname")[1]
        self._writers |= {client, server}
        self._upstream_ports.add(upstream_port)
        await asyncio.gather(self._pump(client_reader, server), self._pump(server_reader, client))
        self._writers -= {client, server}
        self._upstream_ports.discard(upstream_port)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; a delayed chunk goes out `delay` after it came in, in order."""
        assert self._gate is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._gate_open()
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(send())
        try:
            while True:
                await self._gate_open()  # paused: stop reading, so the peer's buffers fill up
                data = await reader.read(_CHUNK)
                await queue.put((loop.time() + self.delay, data))
                if not data:
                    break
            await sender
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            writer.close()

    async def _gate_open(self) -> None:
        assert self._gate is not None
        await self._gate.wait()


@contextmanager
def tcp_proxy(target_port: int, delay: float = 0.0) -> Iterator[TcpProxy]:
    """A started proxy to `target_port`, stopped on exit (also on failure)."""
    proxy = TcpProxy(target_port, delay).start()
    try:
        yield proxy
    finally:
        proxy.stop()
