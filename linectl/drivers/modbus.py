"""The Modbus TCP driver: one connection per PLC, block reads, commands by echoed sequence number.

Registers are numbered as on the wire and in the config: 0-based holding register addresses
(register 104 is 40105 in the 4xxxx notation of some PLC tools). Error messages use that number.

pymodbus is only a framer here: its reconnect is off (``reconnect_delay=0``), it never retries
(``retries=0``) and its own response timeout is set longer than ours, so every deadline is an
``asyncio.timeout`` scope of this module and ``run()`` alone decides when to reconnect.

With ``tls`` configured the connection is Modbus/TCP Security: pymodbus' TLS client over an
SSL context of linectl.tls (verification on, mutual auth), and TLS failures are told as such.
Whatever the transport, the driver writes nothing but the command areas of its stations
(``write_allow_list``); any other write is refused before it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Mapping

from pymodbus.client import AsyncModbusTcpClient, AsyncModbusTlsClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from linectl.config import ModbusPlc, Station
from linectl.contract import (
    H_HEARTBEAT,
    HEADER_WORDS,
    S_ACK_SEQ,
    S_UNIT,
    SLOT_WORDS,
    CmdStatus,
    Command,
    ContractViolation,
    SlotStatus,
    block_words,
    command_address,
    decode_slot_status,
    decode_station,
    encode_command,
    slot_base,
)
from linectl.drivers.base import (
    Backoff,
    ConnectionChange,
    DriverStatistics,
    EventSink,
    PlcDriver,
    SlotGuard,
    SlotUpdate,
    StationViolation,
)
from linectl.drivers.modbus_map import BlockRead, WriteArea, plan_reads, write_allow_list
from linectl.errors import (
    CommandRefused,
    ConfigError,
    PlcConnectionLost,
    PlcError,
    PlcTimeout,
    ProtocolViolation,
)
from linectl.security import PlcSecurityError
from linectl.tls import LossReason, client_context, describe_tls_error

log = logging.getLogger(__name__)

# One unanswered request may be a hiccup; this many in a row is a half-open connection.
MAX_CONSECUTIVE_TIMEOUTS = 2
_EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION",
    2: "ILLEGAL_DATA_ADDRESS",
    3: "ILLEGAL_DATA_VALUE",
    4: "SERVER_DEVICE_FAILURE",
    6: "SERVER_DEVICE_BUSY",
    10: "GATEWAY_PATH_UNAVAILABLE",
    11: "GATEWAY_TARGET_FAILED_TO_RESPOND",
}


__all__ = ["BlockRead", "ModbusDriver", "WriteArea", "plan_reads", "write_allow_list"]


class _FastReadResponse(ReadHoldingRegistersResponse):
    """pymodbus 3.16 decodes a read response with one struct call per register and formats it
    whole for a debug log, the larger part of the driver's CPU: one struct call, a short str."""

    def decode(self, data: bytes) -> None:
        size = data[0]
        if size >= len(data) or size % 2:
            raise ModbusIOException(
                f"byte_count {size} does not fit a packet of {len(data)} bytes",
                function_code=self.function_code,
            )
        self.registers = list(struct.unpack(f">{size // 2}H", data[1 : 1 + size]))

    def __str__(self) -> str:
        # pymodbus formats every decoded PDU for a debug log even when debug is off.
        return f"ReadHoldingRegistersResponse({len(self.registers)} registers)"


def _exception_name(response: ModbusPDU) -> str:
    code = getattr(response, "exception_code", 0)
    return f"{_EXCEPTION_NAMES.get(code, 'exception')} ({code})"


def _detail(message: str, where: str) -> str:
    return message.removeprefix(f"{where}: ")


def _command_name(code: int) -> str:
    try:
        return Command(code).name
    except ValueError:
        return f"code {code}"


class ModbusDriver(PlcDriver):
    """One Modbus TCP PLC: polls its station blocks, sends commands, reconnects with backoff.

    Polls never overlap: the next one starts ``poll_interval_s`` after the previous one started,
    or at once if that one overran (no catch-up burst). The first poll is delayed by a random
    fraction of the interval so a hundred PLCs are not read in the same millisecond.
    """

    protocol = "modbus"
    config: ModbusPlc

    def __init__(
        self,
        name: str,
        config: ModbusPlc,
        stations: Mapping[str, Station],
        sink: EventSink,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(name, config, stations, sink)
        self._rng = rng
        self._reads = plan_reads(self.stations)
        self._base = {n: int(st.address) for n, st in self.stations.items()}
        self._writable = write_allow_list(self.stations)
        self._loss: LossReason | None = None  # why the TLS connection ended, if it told
        self._answered = False  # whether the PLC answered anything on this connection
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, rng=rng)
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()  # one request at a time on the one connection
        self._in_flight = False
        self._consecutive_timeouts = 0
        # What we last saw and told, per station or (station, slot).
        self._raw: dict[str, list[int]] = {}
        self._last: dict[tuple[str, int], SlotStatus | None] = {}
        self._guard = SlotGuard()
        self._violations: dict[tuple[str, int | None], str] = {}
        self._heartbeat: int | None = None
        self._heartbeat_at = 0.0
        # Statistics.
        self.polls_started = 0
        self._requests = 0
        self._errors = 0
        self._reconnects = 0
        self._request_seconds = 0.0
        self._connected_at: float | None = None
        self._last_error = ""

    # --- the connection's life ------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self._rng() * self.config.poll_interval_s)
        ever_connected = False
        down_since: float | None = None
        while True:
            try:
                self._client = await self._connect()
                await self._resync()
                if ever_connected:
                    self._reconnects += 1
                if down_since is not None:
                    log.warning("%s recovered after %.1f s", self.where, loop.time() - down_since)
                    down_since = None
                else:
                    log.info("%s connected", self.where)
                ever_connected = True
                await self._poll_forever()
            except PlcError as exc:
                reason = str(exc)
                self._last_error = reason
                was_connected = self.connected
                self._disconnect()
                if was_connected:
                    self._sink(ConnectionChange(self.name, False, reason, loop.time()))
                if down_since is None:
                    down_since = loop.time()
                    what = "connection lost" if was_connected else "unreachable"
                    log.warning("%s %s: %s", self.where, what, _detail(reason, self.where))
                else:
                    log.debug("%s still unreachable: %s", self.where, _detail(reason, self.where))
            finally:
                self._disconnect()
            await asyncio.sleep(self._backoff.next_delay())

    async def _connect(self) -> AsyncModbusTcpClient:
        c = self.config
        options = {
            "port": c.port,
            "name": self.name,
            "reconnect_delay": 0,
            "retries": 0,
            # Longer than our own deadlines, so pymodbus never times out first.
            "timeout": 2 * max(c.timeout_s, c.connect_timeout_s) + 1,
            "trace_connect": lambda up: self._on_trace_connect(client, up),
        }
        if c.tls is None:
            client = AsyncModbusTcpClient(c.host, **options)
        else:
            # Files are read at every connect, so rotated certificates take effect on reconnect.
            try:
                sslctx = client_context(c.tls, f"plcs.{self.name}.tls")
            except ConfigError as exc:
                raise PlcSecurityError(f"{self.where}: TLS: {exc}", plc=self.name) from exc
            client = AsyncModbusTlsClient(c.host, sslctx=sslctx, **options)
        client.register(_FastReadResponse)
        self._answered = False
        self._loss = None
        try:
            async with asyncio.timeout(c.connect_timeout_s):
                if c.tls is None:
                    # pymodbus' connect() swallows the OSError and returns False; its factory
                    # (the same create_connection call) lets us log why: refused, unreachable...
                    await client.ctx.call_create()
                else:
                    await self._connect_tls(client, sslctx)
        except TimeoutError as exc:
            client.close()
            if self._loss is not None:  # TCP is up: the handshake is what hangs
                raise PlcConnectionLost(
                    f"{self.where}: TLS handshake: no answer within {c.connect_timeout_s} s "
                    f"(a plaintext Modbus TCP port?)",
                    plc=self.name,
                ) from exc
            raise PlcConnectionLost(
                f"{self.where}: connect timeout after {c.connect_timeout_s} s", plc=self.name
            ) from exc
        except OSError as exc:
            client.close()
            if isinstance(exc, ssl.SSLError) or self._loss is not None:
                # An SSLError's errno is OpenSSL's, not the system's: never os.strerror it.
                raise PlcSecurityError(
                    f"{self.where}: TLS: {describe_tls_error(exc)}", plc=self.name
                ) from exc
            # asyncio words it "Connect call failed (host, port)": say why, not where.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise PlcConnectionLost(f"{self.where}: connect failed: {why}", plc=self.name) from exc
        return client

    async def _connect_tls(self, client: AsyncModbusTcpClient, sslctx: ssl.SSLContext) -> None:
        """Connect and handshake with our SSL context, naming the host the PLC's certificate
        must carry (pymodbus passes none); ``_connect``'s deadline covers the handshake."""
        tls = self.config.tls
        assert tls is not None

        def protocol() -> asyncio.Protocol:
            # asyncio asks for the protocol once TCP is up, before the handshake starts.
            self._loss = LossReason(client.ctx.handle_new_connection())
            return self._loss

        await asyncio.get_running_loop().create_connection(
            protocol,
            self.config.host,
            self.config.port,
            ssl=sslctx,
            server_hostname=tls.server_hostname or self.config.host,
        )

    def _on_trace_connect(self, client: AsyncModbusTcpClient, up: bool) -> None:
        # pymodbus leaves a request waiting for its own (long) timeout when the peer closes the
        # connection; fail it now so the loss is seen at once.
        if not up and self._in_flight and client is self._client:
            future = client.ctx.response_future
            if not future.done():
                future.set_exception(ConnectionException(self._closed_reason()))

    def _closed_reason(self) -> str:
        """Why the PLC closed the connection, as far as we can tell."""
        error = self._loss.error if self._loss is not None else None
        if isinstance(error, ssl.SSLError):
            return f"TLS: {describe_tls_error(error)}"
        if self._answered:
            return "connection closed by the PLC"
        if self.config.tls is not None:
            # TLS 1.3 checks our certificate after our side of the handshake is done; a PLC
            # that refuses it may just close the connection.
            return (
                "the PLC closed the connection after the TLS handshake, before answering: it "
                f"refused our certificate (is plcs.{self.name}.tls.certificate issued by a CA "
                "the PLC trusts?)"
            )
        return (
            "the PLC closed the connection before answering: does this port expect TLS "
            f"(Modbus/TCP Security)? Then configure plcs.{self.name}.tls"
        )

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self._connected.clear()
        self._connected_at = None

    async def _resync(self) -> None:
        """Re-read every station; emit every slot (resync), then announce the connection."""
        self._raw.clear()
        self._last.clear()
        self._violations.clear()
        self._heartbeat = None
        self._consecutive_timeouts = 0
        await self._poll(resync=True)
        loop = asyncio.get_running_loop()
        self._connected_at = time.monotonic()
        self._connected.set()
        self._sink(ConnectionChange(self.name, True, "connected", loop.time()))

    async def _poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval_s
        next_at = loop.time() + interval
        while True:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, loop.time())
            try:
                await self._poll(resync=False)
            except PlcTimeout as exc:
                if self._consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS:
                    raise PlcConnectionLost(
                        f"{self.where}: no answer to {self._consecutive_timeouts} requests in a "
                        f"row (half-open connection?)",
                        plc=self.name,
                    ) from exc
            self._check_heartbeat(loop.time())

    def _check_heartbeat(self, now: float) -> None:
        if self._reads and now - self._heartbeat_at > self.config.heartbeat_timeout_s:
            raise PlcConnectionLost(
                f"{self.where}: heartbeat frozen at {self._heartbeat} for "
                f"{now - self._heartbeat_at:.1f} s",
                plc=self.name,
            )

    # --- requests: the one place pymodbus errors are translated ------------------------------

    async def _request(
        self, what: str, call: Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]
    ) -> ModbusPDU:
        loop = asyncio.get_running_loop()
        async with self._lock:
            client = self._client
            if client is None:
                raise PlcConnectionLost(f"{self.where}: {what}: not connected", plc=self.name)
            if not client.connected:
                raise PlcConnectionLost(
                    f"{self.where}: {what}: {self._closed_reason()}", plc=self.name
                )
            task = asyncio.current_task()
            cancelling = task.cancelling() if task else 0
            started = loop.time()
            self._requests += 1
            self._in_flight = True
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    try:
                        response = await call(client)
                    except ModbusIOException:
                        # Some pymodbus versions turn a cancelled request into this: restore
                        # the cancellation so a deadline stays a timeout and a cancel a cancel.
                        if task is not None and task.cancelling() > cancelling:
                            raise asyncio.CancelledError from None
                        raise
                    if task is not None and task.cancelling() > cancelling:
                        # pymodbus awaits asyncio.wait_for, which on Python 3.11 returns the
                        # result and drops a cancellation arriving with the response (cpython
                        # gh-86296): deliver it, or run() would never stop.
                        raise asyncio.CancelledError
            except TimeoutError as exc:
                self._failed(f"{what}: no answer within {self.config.timeout_s} s")
                self._consecutive_timeouts += 1
                raise PlcTimeout(self._last_error, plc=self.name) from exc
            except ModbusException as exc:
                self._failed(f"{what}: connection lost: {exc}")
                raise PlcConnectionLost(self._last_error, plc=self.name) from exc
            finally:
                self._in_flight = False
                self._request_seconds += loop.time() - started
        self._consecutive_timeouts = 0
        self._answered = True
        if response.isError():
            self._failed(f"{what}: refused with {_exception_name(response)}")
        return response

    def _read(self, start: int, count: int, context: str = "") -> Awaitable[ModbusPDU]:
        unit_id = self.config.unit_id
        return self._request(
            f"{context}read of registers {start}..{start + count - 1}",
            lambda c: c.read_holding_registers(start, count=count, device_id=unit_id),
        )

    def _failed(self, what: str) -> None:
        self._errors += 1
        self._last_error = f"{self.where}: {what}"

    # --- polling ---------------------------------------------------------------------------------

    async def _poll(self, *, resync: bool) -> None:
        self.polls_started += 1
        for read in self._reads:
            response = await self._read(read.start, read.count)
            at = asyncio.get_running_loop().time()
            words = list(response.registers)
            if response.isError() or len(words) != read.count:
                problem = (
                    f"refused with {_exception_name(response)}"
                    if response.isError()
                    else f"answered {len(words)} registers, expected {read.count}"
                )
                for station, offset, _ in read.stations:
                    base = read.start + offset
                    self._violate(station, None, f"read from register {base}: {problem}", at)
                continue
            for station, offset, capacity in read.stations:
                self._observe(station, words, offset, capacity, at, resync)

    def _observe(
        self, station: str, words: list[int], offset: int, capacity: int, at: float, resync: bool
    ) -> None:
        raw = words[offset : offset + block_words(capacity)]
        heartbeat = raw[H_HEARTBEAT]
        if heartbeat != self._heartbeat:
            if self._heartbeat is not None:
                # A live heartbeat, not a mere connect, proves the PLC healthy: only now may the
                # next outage start again from the shortest delay (no flapping on a frozen PLC).
                self._backoff.reset()
            self._heartbeat, self._heartbeat_at = heartbeat, at
        raw[H_HEARTBEAT] = 0  # it changes all the time; compare the rest
        if not resync and raw == self._raw.get(station):
            return
        self._raw[station] = raw
        base = self._base[station]
        try:
            slots: list[SlotStatus | None] = list(decode_station(raw, capacity).slots)
            self._clear(station, None)
        except ContractViolation as exc:
            if exc.offset < HEADER_WORDS:
                self._violate(station, None, f"{exc} at register {base + exc.offset}", at)
                return
            self._clear(station, None)
            slots = []
            for slot in range(capacity):
                start = HEADER_WORDS + slot * SLOT_WORDS
                try:
                    slots.append(decode_slot_status(raw[start : start + SLOT_WORDS], start))
                except ContractViolation as bad:
                    self._violate(station, slot, f"{bad} at register {base + bad.offset}", at)
                    slots.append(None)
        for slot, status in enumerate(slots):
            if status is not None:
                self._check_slot(station, slot, status, at, resync)

    def _check_slot(
        self, station: str, slot: int, status: SlotStatus, at: float, resync: bool
    ) -> None:
        key = (station, slot)
        first = slot_base(self._base[station], slot)
        if resync:
            self._guard.baseline(key, status)
        problem = self._guard.check(key, status)
        if problem is not None:
            field, text = problem
            register = first + (S_ACK_SEQ if field == "ack_seq" else S_UNIT)
            self._violate(station, slot, f"{text} at register {register}", at)
            return
        if self._clear(station, slot):
            self._last[key] = None  # tell the recovered status even if it equals the old one
        if resync or status != self._last.get(key):
            self._last[key] = status
            self._sink(SlotUpdate(self.name, station, slot, status, at, resync=resync))

    def _violate(self, station: str, slot: int | None, problem: str, at: float) -> None:
        """Report a contract violation once, until the value comes back into the contract."""
        where = f"{self.where} station '{station}'" + ("" if slot is None else f" slot {slot}")
        message = f"{where}: {problem}"
        if self._violations.get((station, slot)) == message:
            return
        self._violations[(station, slot)] = message
        if slot is not None:
            self._last[(station, slot)] = None
        else:
            self._raw.pop(station, None)  # decode it again once the header is back
        log.warning("%s", message)
        error = ProtocolViolation(message, plc=self.name, station=station)
        self._sink(StationViolation(self.name, station, slot, error, at))

    def _clear(self, station: str, slot: int | None) -> bool:
        return self._violations.pop((station, slot), None) is not None

    # --- commands ----------------------------------------------------------------------------

    async def command(
        self, station: str, slot: int, seq: int, code: Command, unit: int
    ) -> SlotStatus:
        config = self.stations.get(station)
        if config is None:
            raise ValueError(f"{self.where}: no station '{station}' on this PLC")
        if not 0 <= slot < config.capacity:
            raise ValueError(
                f"{self.where} station '{station}': slot {slot} outside 0..{config.capacity - 1}"
            )
        where = f"{self.where} station '{station}' slot {slot}"
        words = encode_command(seq, code, unit)
        if not self.connected:
            raise PlcConnectionLost(f"{where}: not connected", plc=self.name, station=station)
        if code == Command.START and unit:
            # Before the write: a poll may show the unit before this coroutine resumes.
            self._guard.commanded((station, slot), unit)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await self._write_command(station, slot, words)
                status = await self._read_slot(station, slot)
                while status.ack_seq != seq:
                    await asyncio.sleep(min(self.config.poll_interval_s, 0.01))
                    status = await self._read_slot(station, slot)
        except TimeoutError as exc:
            raise PlcTimeout(
                f"{where}: no echo of command {_command_name(code)} seq {seq} within "
                f"{self.config.timeout_s} s",
                plc=self.name,
                station=station,
            ) from exc
        except PlcError as exc:
            exc.station = station
            raise
        if status.cmd_status != CmdStatus.ACCEPTED:
            raise CommandRefused(
                f"{where}: command {_command_name(code)} seq {seq} refused: "
                f"{status.cmd_status.name}",
                plc=self.name,
                station=station,
            )
        return status

    async def _write_command(self, station: str, slot: int, words: list[int]) -> None:
        address = command_address(self._base[station], slot)
        await self._write(
            address, words, f"station '{station}' slot {slot}: command write", station=station
        )

    async def _write(
        self, address: int, words: list[int], what: str, *, station: str | None = None
    ) -> None:
        """Every write this driver makes goes through here, and is refused before anything is
        sent unless it lies within one command area of the allow-list."""
        end = address + len(words)
        if not words or not any(a.start <= address and end <= a.end for a in self._writable):
            self._failed(
                f"{what}: write of registers {address}..{end - 1} refused, not sent: "
                f"{self._outside_allow_list(address, end)}"
            )
            raise ProtocolViolation(self._last_error, plc=self.name, station=station)
        unit_id = self.config.unit_id
        response = await self._request(
            f"{what} at register {address}",
            lambda c: c.write_registers(address, words, device_id=unit_id),
        )
        if response.isError():
            raise ProtocolViolation(self._last_error, plc=self.name, station=station)

    def _outside_allow_list(self, start: int, end: int) -> str:
        if not self._writable:
            return "this PLC has no stations, so linectl writes nothing to it"
        nearest = min(self._writable, key=lambda a: max(a.start - end, start - a.end, 0))
        return (
            f"linectl writes only within one command area of this PLC's stations "
            f"(nearest: {nearest})"
        )

    async def _read_slot(self, station: str, slot: int) -> SlotStatus:
        base = self._base[station]
        first = slot_base(base, slot)
        response = await self._read(first, SLOT_WORDS, f"station '{station}' slot {slot}: ")
        if response.isError():
            raise ProtocolViolation(self._last_error, plc=self.name, station=station)
        try:
            return decode_slot_status(response.registers, first - base)
        except ContractViolation as exc:
            raise ProtocolViolation(
                f"{self.where} station '{station}' slot {slot}: {exc} at register "
                f"{base + exc.offset}",
                plc=self.name,
                station=station,
            ) from exc

    # --- statistics ----------------------------------------------------------------------------

    def statistics(self) -> DriverStatistics:
        since = None
        if self._connected_at is not None:
            since = time.monotonic() - self._connected_at
        return DriverStatistics(
            plc=self.name,
            protocol=self.protocol,
            connected=self.connected,
            requests=self._requests,
            errors=self._errors,
            reconnects=self._reconnects,
            request_seconds_total=self._request_seconds,
            since_connected_s=since,
            last_error=self._last_error,
        )
