"""Modbus TCP on the wire: one asyncio protocol per PLC connection, one request in flight, its
answer delivered through one future.

Only what linectl sends is spoken: Read Holding Registers (function 3) and Write Multiple
Registers (function 16), each an MBAP header and a PDU packed and checked with ``struct``.
pymodbus' framer and PDU classes cost 8 us per exchange against 1 us for these few lines (a
read of 24 registers, built and decoded), and its framer skips an answer with the wrong
transaction or unit id in silence, where we report it. No deadline lives here: the driver
awaits each future inside its own ``asyncio.timeout`` scope.

``open_wire`` connects (with ``tls`` configured, Modbus/TCP Security: asyncio's TLS over an SSL
context of linectl.tls, verification on, the PLC's name checked) and translates a failure to
connect into linectl's errors; ``closed_reason`` says why a connection ended.

An answer outside the protocol (an unknown protocol id or length, another function code, a
byte count that does not fit, the wrong unit, a transaction nobody asked for) means the byte
stream can no longer be trusted: the request fails with ``WireGarbled`` and the connection is
closed. A late answer to a request the driver gave up on is dropped, as expected traffic.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
from collections import deque
from dataclasses import dataclass

from linectl.config import ModbusPlc
from linectl.errors import ConfigError, PlcConnectionLost
from linectl.security import PlcSecurityError
from linectl.tls import client_context, describe_tls_error

# MBAP header: transaction id, protocol id (0 for Modbus), length of what follows, unit id.
_MBAP = struct.Struct(">HHHB")
_READ = struct.Struct(">HHHBBHH")  # MBAP, function 3, first register, count
_WRITE = struct.Struct(">HHHBBHHB")  # MBAP, function 16, first register, count, byte count
_ECHO = struct.Struct(">HH")  # a write's answer: first register, count
_MAX_LENGTH = 254  # the MBAP length of the largest PDU (253 bytes) with its unit id
_ABANDONED_KEPT = 16  # late answers we still recognise, per connection

READ_HOLDING_REGISTERS = 3
WRITE_MULTIPLE_REGISTERS = 16

_EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION",
    2: "ILLEGAL_DATA_ADDRESS",
    3: "ILLEGAL_DATA_VALUE",
    4: "SERVER_DEVICE_FAILURE",
    6: "SERVER_DEVICE_BUSY",
    10: "GATEWAY_PATH_UNAVAILABLE",
    11: "GATEWAY_TARGET_FAILED_TO_RESPOND",
}


class WireError(Exception):
    """The request failed with the connection: it is closed or closing."""


class WireClosed(WireError):
    """The connection ended with a request in flight (or before one was sent)."""


class WireGarbled(WireError):
    """The PLC answered outside the Modbus TCP protocol; the message says how."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An exception response: the PLC understood the request and refused it."""

    function_code: int
    code: int

    def __str__(self) -> str:
        return f"{_EXCEPTION_NAMES.get(self.code, 'exception')} ({self.code})"


class Turn:
    """Whose turn it is to use the one connection, in the order asked: coroutines (a command's
    requests) and callbacks (the scheduled poll) alike, which an ``asyncio.Lock`` cannot serve
    without a task per poll. Whoever takes the turn, or is handed it, holds it until ``give``."""

    def __init__(self) -> None:
        self._held = False
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._passes = 0  # times the turn was given: progress, for ``acquire``'s patience

    def take(self) -> bool:
        """Take the turn if it is free; nobody waits while it is (``give`` hands it on)."""
        if self._held:
            return False
        self._held = True
        return True

    def wait(self) -> asyncio.Future[None]:
        """After ``take`` failed: a future done when the turn is handed over, its owner then
        holding it. Cancel it to stop waiting; if it is done already, ``give`` instead."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return future

    async def acquire(self, patience: float) -> bool:
        """Take the turn, in line behind the others. False, not holding it, once ``patience``
        seconds pass without the turn changing hands: a queue behind a slow but working link
        keeps waiting, one behind a request that hangs gives up."""
        if self.take():
            return True
        handed = self.wait()
        acquired = False
        try:
            while True:
                passes = self._passes
                done, _ = await asyncio.wait({handed}, timeout=patience)
                if done:
                    acquired = True
                    return True
                if self._passes == passes:
                    return False
        finally:
            if not acquired and not handed.cancel():
                self.give()  # handed to us just as we gave up (or were cancelled): pass it on

    def give(self) -> None:
        self._passes += 1
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():  # not cancelled: its owner holds the turn from now on
                future.set_result(None)
                return
        self._held = False


class ModbusWire(asyncio.Protocol):
    """One connection to one PLC. ``read`` and ``write`` send a request and return the future
    of its answer; the caller sends the next only once that one is done (the driver's lock)."""

    def __init__(self, unit_id: int) -> None:
        self.unit_id = unit_id
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.answered = False  # whether the PLC answered anything on this connection
        self.error: Exception | None = None  # why the connection ended, if anyone said
        self._loop = asyncio.get_running_loop()
        self._buffer = b""
        self._tid = 0
        self._pending: int | None = None  # the transaction id whose answer is awaited
        self._future: asyncio.Future[object] | None = None
        self._function = 0
        self._expect = 0  # function 3: registers asked; 16: the echo of (first, count)
        self._abandoned: dict[int, None] = {}  # transaction ids given up on, oldest first

    # --- requests -----------------------------------------------------------------------------

    def read(self, first: int, count: int) -> asyncio.Future[list[int] | Refusal]:
        """Read Holding Registers: the registers as answered (the caller checks the count), or
        the PLC's refusal."""
        tid = self._next_tid()
        frame = _READ.pack(tid, 0, 6, self.unit_id, READ_HOLDING_REGISTERS, first, count)
        return self._send(frame, tid, READ_HOLDING_REGISTERS, count)  # type: ignore[return-value]

    def write(self, first: int, words: list[int]) -> asyncio.Future[Refusal | None]:
        """Write Multiple Registers: None once the PLC echoed the write, or its refusal."""
        tid = self._next_tid()
        n = len(words)
        frame = _WRITE.pack(
            tid, 0, 7 + 2 * n, self.unit_id, WRITE_MULTIPLE_REGISTERS, first, n, 2 * n
        ) + struct.pack(f">{n}H", *words)
        return self._send(frame, tid, WRITE_MULTIPLE_REGISTERS, first << 16 | n)  # type: ignore[return-value]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _next_tid(self) -> int:
        self._tid = self._tid % 0xFFFF + 1  # 1..65535: 0 reads as "no transaction" elsewhere
        return self._tid

    def _send(self, frame: bytes, tid: int, function: int, expect: int) -> asyncio.Future[object]:
        future = self._loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(WireClosed("not connected"))
            return future
        if self._future is not None and not self._future.done():
            raise RuntimeError("a Modbus request is already in flight on this connection")
        if self._pending is not None:
            # The previous request was given up on: its answer may still come, and is dropped.
            self._abandoned[self._pending] = None
            if len(self._abandoned) > _ABANDONED_KEPT:
                del self._abandoned[next(iter(self._abandoned))]
        self._pending, self._future = tid, future
        self._function, self._expect = function, expect
        self.transport.write(frame)
        return future

    # --- answers ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        while len(buf) >= 8:
            tid, protocol, length, unit = _MBAP.unpack_from(buf)
            if protocol or not 2 <= length <= _MAX_LENGTH:
                self._garbled(f"not a Modbus TCP answer (protocol id {protocol}, length {length})")
                return
            end = 6 + length
            if len(buf) < end:
                break
            self._answer(tid, unit, buf[7:end])
            if self.closed:
                return
            buf = buf[end:]
        self._buffer = buf

    def _answer(self, tid: int, unit: int, pdu: bytes) -> None:
        if tid != self._pending:
            if tid in self._abandoned:
                del self._abandoned[tid]  # a late answer to a request given up on
                return
            expected = "none" if self._pending is None else str(self._pending)
            self._garbled(f"answered transaction {tid}, expected {expected}")
            return
        self._pending = None
        if unit != self.unit_id:
            self._garbled(f"answered for unit {unit}, asked unit {self.unit_id}")
            return
        function = pdu[0]
        result: object
        if function == self._function | 0x80 and len(pdu) == 2:
            result = Refusal(self._function, pdu[1])
        elif function != self._function:
            self._garbled(f"answered function {function} to a request of function {self._function}")
            return
        elif function == READ_HOLDING_REGISTERS:
            size = len(pdu) - 2
            if size < 0 or pdu[1] != size or size % 2:
                self._garbled(f"a read answer of {len(pdu)} bytes: {pdu.hex()}")
                return
            result = list(struct.unpack_from(f">{size // 2}H", pdu, 2))
        else:
            if len(pdu) != 5 or _ECHO.unpack_from(pdu, 1) != divmod(self._expect, 1 << 16):
                self._garbled(f"a write answer that does not echo the write: {pdu.hex()}")
                return
            result = None
        self.answered = True
        future = self._future
        if future is not None and not future.done():  # not given up on meanwhile
            future.set_result(result)

    def _garbled(self, problem: str) -> None:
        self._fail(WireGarbled(problem))
        self._buffer = b""
        if self.transport is not None:
            self.transport.abort()  # the stream is out of step: nothing after this is trusted

    def _fail(self, error: WireError) -> None:
        if self.error is None:
            self.error = error
        self.closed = True
        future = self._future
        if future is not None and not future.done():
            future.set_exception(error)

    # --- the connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        # The first reason is kept: a garbled answer, then the abort that follows it.
        if self.error is None:
            self.error = exc
        self._fail(WireClosed(str(exc) if exc else "closed by the PLC"))


# --- connecting -------------------------------------------------------------------------------


async def open_wire(config: ModbusPlc, name: str, where: str) -> ModbusWire:
    """A connection to the PLC of ``config`` (``name`` and ``where`` name it in errors), within
    its ``connect_timeout_s``, TLS handshake included; raises PlcConnectionLost saying why not."""
    c = config
    sslctx: ssl.SSLContext | None = None
    if c.tls is not None:
        # Files are read at every connect, so rotated certificates take effect on reconnect.
        try:
            sslctx = client_context(c.tls, f"plcs.{name}.tls")
        except ConfigError as exc:
            raise PlcSecurityError(f"{where}: TLS: {exc}", plc=name) from exc
    wire = ModbusWire(c.unit_id)
    tcp_up = False

    def protocol() -> ModbusWire:
        # asyncio asks for the protocol once TCP is up, before a TLS handshake starts.
        nonlocal tcp_up
        tcp_up = True
        return wire

    try:
        async with asyncio.timeout(c.connect_timeout_s):
            await asyncio.get_running_loop().create_connection(
                protocol,
                c.host,
                c.port,
                ssl=sslctx,
                # The name the PLC's certificate must carry.
                server_hostname=None if c.tls is None else c.tls.server_hostname or c.host,
            )
    except TimeoutError as exc:
        wire.close()
        if sslctx is not None and tcp_up:  # TCP is up: the handshake is what hangs
            raise PlcConnectionLost(
                f"{where}: TLS handshake: no answer within {c.connect_timeout_s} s "
                f"(a plaintext Modbus TCP port?)",
                plc=name,
            ) from exc
        raise PlcConnectionLost(
            f"{where}: connect timeout after {c.connect_timeout_s} s", plc=name
        ) from exc
    except OSError as exc:
        wire.close()
        if isinstance(exc, ssl.SSLError) or tcp_up:
            # An SSLError's errno is OpenSSL's, not the system's: never os.strerror it.
            raise PlcSecurityError(f"{where}: TLS: {describe_tls_error(exc)}", plc=name) from exc
        # asyncio words it "Connect call failed (host, port)": say why, not where.
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise PlcConnectionLost(f"{where}: connect failed: {why}", plc=name) from exc
    return wire


def closed_reason(wire: ModbusWire | None, config: ModbusPlc, name: str) -> str:
    """Why the connection to PLC ``name`` ended, as far as we can tell."""
    error = wire.error if wire is not None else None
    if isinstance(error, ssl.SSLError):
        return f"TLS: {describe_tls_error(error)}"
    if isinstance(error, WireGarbled):
        return f"protocol error: {error}"
    if wire is not None and wire.answered:
        return "connection closed by the PLC"
    if config.tls is not None:
        # TLS 1.3 checks our certificate after our side of the handshake is done; a PLC that
        # refuses it may just close the connection.
        return (
            "the PLC closed the connection after the TLS handshake, before answering: it "
            f"refused our certificate (is plcs.{name}.tls.certificate issued by a CA the PLC "
            "trusts?)"
        )
    return (
        "the PLC closed the connection before answering: does this port expect TLS "
        f"(Modbus/TCP Security)? Then configure plcs.{name}.tls"
    )
