"""A lean MQTT 3.1.1 client connection for publishing: one asyncio protocol, no threads.

linectl publishes a line's every state change (hundreds a second on a large plant) and reads
one command topic (Sparkplug's NCMD). aiomqtt over paho-mqtt cost 105-168 us of CPU per
message on this machine (paho alone 86-116 us: a socket send and a self-pipe write per
message, a properties object per acknowledgement), ten times the budget of issue 15. Here a
message is a few bytes appended to a buffer written once per loop iteration, and an
acknowledgement is a dict lookup.

What it does, and nothing more (MQTT 3.1.1, OASIS standard, sections in brackets):

- CONNECT with clean session, a will, user and password, keepalive; CONNACK's refusal codes
  become ``MqttRefused`` (3.1, 3.2).
- PUBLISH at QoS 0, 1 and 2; ``publish`` returns the packet id to watch (0 for QoS 0: done
  once written) and ``acked`` tells when the broker has it (PUBACK, or PUBREC/PUBREL/PUBCOMP).
- SUBSCRIBE (awaits SUBACK) and incoming PUBLISH at QoS 0 and 1, answered with PUBACK.
- PINGREQ every ``keepalive_s``; no PINGRESP, PUBACK or SUBACK within ``timeout_s`` is a lost
  connection (a half-open TCP connection is noticed in seconds, not at the OS's timeout).
- DISCONNECT on a clean close, so the broker drops the will.
- TLS, with the caller's verifying SSL context (``linectl.tls.client_context``).

It never reconnects: ``MqttLink`` owns that. Incoming packets are bounded (``MAX_PACKET``);
one larger, or a malformed one, closes the connection with a reason.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable

from linectl.northbound.spool import Message

MAX_PACKET = 1 << 20  # largest packet we accept from the broker (an NCMD is a few bytes)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

REFUSALS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}

_U16 = struct.Struct(">H")
_PINGREQ = bytes((PINGREQ << 4, 0))


class MqttError(ConnectionError):
    """The connection failed or was lost; the message says why."""


class MqttRefused(MqttError):
    """The broker answered CONNECT with a refusal (``rc``, MQTT 3.1.1 section 3.2.2.3)."""

    def __init__(self, rc: int) -> None:
        super().__init__(f"connection refused: {REFUSALS.get(rc, f'return code {rc}')}")
        self.rc = rc


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) > 0xFFFF:
        raise ValueError(f"MQTT string of {len(data)} bytes (at most 65535)")
    return _U16.pack(len(data)) + data


def _length(n: int) -> bytes:
    """The remaining length, as 1 to 4 bytes of 7 bits (section 2.2.3)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes((kind << 4 | flags,)) + _length(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    keepalive_s: int,
    will: Message | None = None,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = 0x02  # clean session
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
    header = _string("MQTT") + bytes((4, flags)) + _U16.pack(keepalive_s)
    return _packet(CONNECT, 0, header + payload)


class MqttConnection(asyncio.Protocol):
    """One connection to a broker. Open it with ``await MqttConnection.open(...)``."""

    def __init__(
        self,
        *,
        timeout_s: float,
        keepalive_s: int,
        on_activity: Callable[[], None],
        on_message: Callable[[str, bytes], None],
    ) -> None:
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self.on_activity = on_activity  # an acknowledgement, room to write, or the loss
        self.on_message = on_message
        self.lost: BaseException | None = None
        self.writable = True
        self.pending: dict[int, float] = {}  # packet id -> when sent, oldest first
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._next_id = 0
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[int]] = {}
        self._ping_handle: asyncio.TimerHandle | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._ping_sent: float | None = None
        self._settled: asyncio.Future[None] | None = None  # while settled() waits

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        client_id: str,
        *,
        connect_timeout_s: float,
        timeout_s: float,
        keepalive_s: int,
        will: Message | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        on_activity: Callable[[], None] = lambda: None,
        on_message: Callable[[str, bytes], None] = lambda topic, payload: None,
    ) -> MqttConnection:
        """TCP (and the TLS handshake, with ``tls``), CONNECT and CONNACK within
        ``connect_timeout_s``; raises ``MqttRefused``, ``MqttError``, ``TimeoutError`` or
        ``OSError`` (``ssl.SSLError`` among them)."""
        conn = cls(
            timeout_s=timeout_s,
            keepalive_s=keepalive_s,
            on_activity=on_activity,
            on_message=on_message,
        )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout_s):
                if tls is None:
                    await loop.create_connection(lambda: conn, host, port)
                else:
                    await loop.create_connection(
                        lambda: conn, host, port, ssl=tls, server_hostname=server_hostname or host
                    )
                conn._write_now(
                    connect_packet(
                        client_id,
                        keepalive_s=keepalive_s,
                        will=will,
                        username=username,
                        password=password,
                    )
                )
                rc = await conn._connack
        except BaseException:
            conn.abort()
            raise
        if rc:
            conn.abort()
            raise MqttRefused(rc)
        conn._ping_handle = loop.call_later(keepalive_s, conn._ping)
        return conn

    # --- sending ----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Queue one PUBLISH; the packet id to watch with ``acked`` (0 for QoS 0)."""
        self._check()
        flags = qos << 1 | retain
        if qos:
            mid = self._new_id()
            body = _string(topic) + _U16.pack(mid) + payload
            self._expect(mid)
        else:
            mid = 0
            body = _string(topic) + payload
        self._send(_packet(PUBLISH, flags, body))
        return mid

    def acked(self, mid: int) -> bool:
        return mid not in self.pending

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        """SUBSCRIBE one filter; the granted QoS. Raises ``MqttError`` on a refusal."""
        self._check()
        mid = self._new_id()
        future: asyncio.Future[int] = self._loop.create_future()
        self._subacks[mid] = future
        self._expect(mid)
        self._send(_packet(SUBSCRIBE, 0x02, _U16.pack(mid) + _string(topic) + bytes((qos,))))
        try:
            granted = await future
        finally:
            self._subacks.pop(mid, None)
        if granted == 0x80:
            raise MqttError(f"the broker refused the subscription to '{topic}'")
        return granted

    async def settled(self, timeout_s: float) -> bool:
        """Wait until every publish is acknowledged (or ``timeout_s``); whether they were."""
        if self.pending and self.lost is None:
            self._settled = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._settled
            except TimeoutError:
                pass
            finally:
                self._settled = None
        return not self.pending

    def disconnect(self) -> None:
        """A clean goodbye: DISCONNECT (the broker drops the will), then close."""
        if self._transport is not None and self.lost is None:
            self._write_now(_packet(DISCONNECT, 0, b""))
            self._transport.close()
        self._lose(MqttError("disconnected by us"))

    def abort(self) -> None:
        """Close at once, without DISCONNECT: the broker sends the will."""
        if self._transport is not None:
            self._transport.abort()
        self._lose(MqttError("closed by us"))

    def _check(self) -> None:
        if self.lost is not None:
            raise MqttError(str(self.lost)) from self.lost

    def _new_id(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self.pending:
                return self._next_id
        raise MqttError("no free packet id: 65535 messages unacknowledged")

    def _expect(self, mid: int) -> None:
        self.pending[mid] = self._loop.time()
        if self._deadline_handle is None:
            self._deadline_handle = self._loop.call_later(self.timeout_s, self._check_deadlines)

    def _send(self, packet: bytes) -> None:
        self._out.append(packet)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now rather than at the end of this loop iteration (so that
        ``writable`` tells whether the transport's buffer is full)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        if self._out and self._transport is not None and self.lost is None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _write_now(self, packet: bytes) -> None:
        self._send(packet)
        self.flush()

    # --- deadlines -----------------------------------------------------------------------

    def _ping(self) -> None:
        if self.lost is not None:
            return
        self._ping_sent = self._loop.time()
        self._send(_PINGREQ)
        self._ping_handle = self._loop.call_later(self.keepalive_s, self._ping)
        if self._deadline_handle is None:
            self._deadline_handle = self._loop.call_later(self.timeout_s, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._deadline_handle = None
        if self.lost is not None:
            return
        now = self._loop.time()
        oldest = min(
            (t for t in (next(iter(self.pending.values()), None), self._ping_sent) if t),
            default=None,
        )
        if oldest is None:
            return
        if now - oldest >= self.timeout_s:
            what = "PINGREQ" if oldest == self._ping_sent else "a message"
            self._fail(f"no answer to {what} within {self.timeout_s} s (half-open connection?)")
            return
        self._deadline_handle = self._loop.call_later(
            oldest + self.timeout_s - now, self._check_deadlines
        )

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(
            MqttError(f"connection lost: {exc}" if exc else "connection closed by the broker")
        )

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.on_activity()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at = 0
        try:
            while (header := _header(buffer, at)) is not None:
                n, start = header
                if len(buffer) - start < n:
                    break
                first = buffer[at]
                self._handle(first >> 4, first & 0x0F, bytes(buffer[start : start + n]))
                at = start + n
        except (MqttError, ValueError, struct.error, UnicodeDecodeError) as exc:
            self._fail(f"protocol error: {exc}")
            return
        del buffer[:at]

    def _handle(self, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBACK or kind == PUBCOMP:
            (mid,) = _U16.unpack_from(body)
            self._acked(mid)
        elif kind == PUBREC:
            (mid,) = _U16.unpack_from(body)
            self._send(_packet(PUBREL, 0x02, body[:2]))
            if self.pending.pop(mid, None) is not None:  # now waiting for PUBCOMP, newest
                self.pending[mid] = self._loop.time()
        elif kind == PUBLISH:
            self._incoming(flags, body)
        elif kind == SUBACK:
            (mid,) = _U16.unpack_from(body)
            future = self._subacks.get(mid)
            self.pending.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(body[2] if len(body) > 2 else 0x80)
        elif kind == PINGRESP:
            self._ping_sent = None
        elif kind == CONNACK:
            if not self._connack.done():
                self._connack.set_result(body[1] if len(body) >= 2 else 0xFF)
        else:
            raise MqttError(f"unexpected packet type {kind}")

    def _acked(self, mid: int) -> None:
        if self.pending.pop(mid, None) is not None:
            self.on_activity()
            if not self.pending and self._settled is not None and not self._settled.done():
                self._settled.set_result(None)

    def _incoming(self, flags: int, body: bytes) -> None:
        qos = flags >> 1 & 0x03
        (n,) = _U16.unpack_from(body)
        topic = body[2 : 2 + n].decode("utf-8")
        at = 2 + n
        if qos == 1:
            self._send(_packet(PUBACK, 0, body[at : at + 2]))
            at += 2
        elif qos:
            raise MqttError(f"an incoming QoS {qos} message on '{topic}' (we subscribe at 1)")
        self.on_message(topic, body[at:])

    def _fail(self, reason: str) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._lose(MqttError(reason))

    def _lose(self, exc: BaseException) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        self.writable = False
        for handle in (self._ping_handle, self._deadline_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        if not self._connack.done():
            self._connack.set_exception(exc)
            self._connack.exception()  # retrieved: open() reports it
        for future in self._subacks.values():
            if not future.done():
                future.set_exception(exc)
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)
        self.on_activity()


def _header(buffer: bytearray, at: int) -> tuple[int, int] | None:
    """The remaining length of the packet at ``at`` and where its body starts, or None while
    the header is not all here (section 2.2.3). Raises on a malformed or oversized one."""
    n = shift = 0
    i = at + 1
    while i < len(buffer):
        byte = buffer[i]
        i += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if n > MAX_PACKET:
                raise MqttError(f"a packet of {n} bytes from the broker (at most {MAX_PACKET})")
            return n, i
        shift += 7
        if shift > 21:
            raise MqttError("malformed remaining length")
    return None
