"""A TCP fault proxy for tests: sits between a client and a server on 127.0.0.1 and breaks the
connection in the ways real networks do, switchable while traffic flows.

    async with FaultProxy(("127.0.0.1", plc_port)) as proxy:
        ...point the client at proxy.port...
        proxy.latency_s = 0.2          # added to every chunk, each way
        proxy.blackhole()              # accepts, never answers; live connections go silent
        proxy.drop_mid_response()      # the next answer is cut half way, then the link closes
        proxy.rst_storm()              # every connection reset now and as soon as it is made
        proxy.half_open()              # server side closed, client side left open and silent
        proxy.trickle(1, 0.002)        # answers come a byte at a time
        proxy.clear()                  # back to a clean wire

Protocol-agnostic, so it serves Modbus TCP, OPC UA, PostgreSQL alike. Loopback only: it binds
127.0.0.1 and refuses an upstream elsewhere. Every connection's tasks are owned by the proxy
and cancelled by ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass, field

_CHUNK = 65_536


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    accepted: int  # connections accepted from clients
    active: int  # connections open now
    resets: int  # connections ended with an RST by the proxy
    cut: int  # answers cut in the middle
    bytes_up: int  # client to server
    bytes_down: int  # server to client


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    silent: bool = False  # forward nothing either way (blackhole, half-open)
    half_open: bool = False  # server side closed on purpose: keep the client side open
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``, with faults set by the methods below."""

    def __init__(self, upstream: tuple[str, int], *, port: int = 0) -> None:
        host, up_port = upstream
        if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
            raise ValueError(f"fault proxy: upstream {host}:{up_port} is not a loopback address")
        self.upstream = (host, up_port)
        self._port = port
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.latency_s = 0.0
        self._blackhole = False
        self._rst = False
        self._cut_after: int | None = None  # bytes of the next answer to let through, then cut
        self._trickle: tuple[int, float] | None = None
        self._accepted = self._resets = self._cut = self._up = self._down = 0

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._abort(conn)
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        return self._server.sockets[0].getsockname()[1]

    # --- faults ---------------------------------------------------------------------------

    def clear(self) -> None:
        """No faults from now on; live silenced connections stay silent (as a real peer's)."""
        self.latency_s = 0.0
        self._blackhole = self._rst = False
        self._cut_after = None
        self._trickle = None

    def blackhole(self, on: bool = True) -> None:
        """New connections are accepted and never answered; live ones carry nothing more."""
        self._blackhole = on
        if on:
            for conn in self._conns:
                conn.silent = True

    def rst_storm(self, on: bool = True) -> None:
        """Reset every live connection now and every new one as soon as it is accepted."""
        self._rst = on
        if on:
            for conn in list(self._conns):
                self._reset(conn)

    def drop_mid_response(self, after: int | None = None) -> None:
        """Cut the next answer from the server after ``after`` bytes (default: half of it),
        then close both sides of that connection."""
        self._cut_after = -1 if after is None else after

    def half_open(self) -> None:
        """The server side of every live connection closes; the client side stays open and
        silent, as when a peer vanishes without a FIN. New connections work."""
        for conn in self._conns:
            conn.silent = conn.half_open = True
            if conn.server is not None:
                conn.server.transport.abort()

    def trickle(self, chunk: int = 1, delay_s: float = 0.002) -> None:
        """Answers reach the client ``chunk`` bytes at a time, ``delay_s`` apart."""
        self._trickle = (chunk, delay_s)

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            accepted=self._accepted,
            active=len(self._conns),
            resets=self._resets,
            cut=self._cut,
            bytes_up=self._up,
            bytes_down=self._down,
        )

    # --- forwarding -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = _Conn(writer)
        self._conns.add(conn)
        self._accepted += 1
        try:
            if self._rst:
                self._reset(conn)
                return
            if self._blackhole:
                conn.silent = True
                await self._discard(reader)
                return
            try:
                up_reader, conn.server = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._reset(conn)
                return
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(conn, reader, up=True))
                tg.create_task(self._pump(conn, up_reader, up=False))
        finally:
            self._conns.discard(conn)
            self._abort(conn)
            self._handlers.discard(task)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(_CHUNK):
                pass

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, *, up: bool) -> None:
        """Read one direction and hand chunks, stamped with their arrival, to ``_deliver``:
        latency delays each chunk without holding up the ones behind it, as on a real link."""
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            deliver = tg.create_task(self._deliver(conn, chunks, up=up))
            try:
                while data := await src.read(_CHUNK):
                    if not conn.silent:
                        await chunks.put((loop.time(), data))
            except OSError:
                pass
            await chunks.put((loop.time(), b""))  # end of stream, after what came before
            await deliver

    async def _deliver(
        self, conn: _Conn, chunks: asyncio.Queue[tuple[float, bytes]], *, up: bool
    ) -> None:
        dst = conn.server if up else conn.client
        assert dst is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                arrived, data = await chunks.get()
                if not data:
                    break
                if conn.silent:
                    continue
                late = arrived + self.latency_s - loop.time()
                if late > 0:
                    # The fault itself: this chunk is late on the wire.
                    await asyncio.sleep(late)
                if up:
                    self._up += len(data)
                    dst.write(data)
                    await dst.drain()
                    continue
                self._down += len(data)
                if self._cut_after is not None:
                    keep = len(data) // 2 if self._cut_after < 0 else self._cut_after
                    self._cut_after = None
                    self._cut += 1
                    dst.write(data[:keep])
                    await dst.drain()
                    self._abort(conn)
                    return
                if self._trickle is not None:
                    size, delay = self._trickle
                    for i in range(0, len(data), size):
                        dst.write(data[i : i + size])
                        await dst.drain()
                        await asyncio.sleep(delay)
                    continue
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        if up or not conn.silent:
            self._abort(conn)
        # Else the server side ended while the link is silenced (half-open, blackhole): the
        # client must not hear of it, so its side stays open until it gives up.

    def _reset(self, conn: _Conn) -> None:
        self._resets += 1
        _reset(conn.client)
        if conn.server is not None:
            _reset(conn.server)

    def _abort(self, conn: _Conn) -> None:
        conn.client.transport.abort()
        if conn.server is not None:
            conn.server.transport.abort()
