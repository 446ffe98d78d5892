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
from linectl.drivers.base import EventSink
from linectl.drivers.core import DriverCore
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


def _command_name(code: int) -> str:
    try:
        return Command(code).name
    except ValueError:
        return f"code {code}"


class ModbusDriver(DriverCore):
    """One Modbus TCP PLC: polls its station blocks, sends commands, reconnects with backoff.

    The connection's life, the poll schedule (never overlapping, first poll jittered), the
    heartbeat and what is told to the supervisor are ``DriverCore``'s; this class reads and
    writes registers.
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
        super().__init__(name, config, stations, sink, rng=rng)
        self._reads = plan_reads(self.stations)
        self.has_heartbeat = bool(self._reads)  # a PLC without stations shows no heartbeat
        self._base = {n: int(st.address) for n, st in self.stations.items()}
        self._writable = write_allow_list(self.stations)
        self._loss: LossReason | None = None  # why the TLS connection ended, if it told
        self._answered = False  # whether the PLC answered anything on this connection
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()  # one request at a time on the one connection
        self._in_flight = False
        self._finished = 0  # requests finished (answered or not) on this driver: progress
        self._raw: dict[str, list[int]] = {}  # each station's block as last decoded
        self.polls_started = 0

    # --- the transport --------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            self._client = await self._connect()
        except PlcError as exc:
            self._failed(str(exc))
            raise

    async def _read_all(self, *, resync: bool) -> None:
        self._raw.clear()
        await self._poll(resync=resync)

    async def _follow(self) -> None:
        await self._poll_forever(lambda: self._poll(resync=False), self.config.poll_interval_s)

    async def _close(self) -> None:
        self._disconnect()

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

    # --- requests: the one place pymodbus errors are translated ------------------------------

    async def _request(
        self, what: str, call: Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]
    ) -> ModbusPDU:
        """One request on the one connection. Two deadlines of ``timeout_s`` each: waiting for
        the connection (``_acquire``), then this request's answer."""
        timeout = self.config.timeout_s
        await self._acquire(what)
        try:
            client = self._client
            if client is None:
                raise PlcConnectionLost(f"{self.where}: {what}: not connected", plc=self.name)
            if not client.connected:
                raise PlcConnectionLost(
                    f"{self.where}: {what}: {self._closed_reason()}", plc=self.name
                )
            task = asyncio.current_task()
            cancelling = task.cancelling() if task else 0
            started = self.now()
            self._requests += 1
            self._in_flight = True
            try:
                async with asyncio.timeout(timeout):
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
                raise self._timed_out(f"{what}: no answer within {timeout} s", started) from exc
            except ModbusException as exc:
                message = self._failed(f"{what}: connection lost: {exc}", started=started)
                raise PlcConnectionLost(message, plc=self.name) from exc
            finally:
                self._in_flight = False
                self._finished += 1
        finally:
            self._lock.release()
        self._request_done(started)
        self._answered = True
        if response.isError():
            self._failed(f"{what}: refused with {_exception_name(response)}")
        return response

    async def _acquire(self, what: str) -> None:
        """Wait for the one connection, in turn. The deadline is ``timeout_s`` without progress:
        a request ahead that finishes restarts it, so a queue of commands behind a slow but
        working link never times out, while one behind a request that hangs does."""
        lock = self._lock
        if not lock.locked():
            await lock.acquire()
            return
        timeout = self.config.timeout_s
        waiting = self.now()
        acquiring = asyncio.ensure_future(lock.acquire())
        acquired = False
        try:
            while True:
                finished = self._finished
                done, _ = await asyncio.wait({acquiring}, timeout=timeout)
                if done:
                    acquired = True
                    return
                if self._finished == finished:
                    raise PlcTimeout(
                        self._failed(
                            f"{what}: waited {timeout} s behind a request that did not finish",
                            started=waiting,
                        ),
                        plc=self.name,
                    )
        finally:
            if not acquired:
                # Give the turn back, also if it was granted just as we gave up (or were
                # cancelled): the waiting task ends here, never after us.
                acquiring.cancel()
                await asyncio.wait({acquiring})
                if not acquiring.cancelled():
                    lock.release()

    def _read(self, start: int, count: int, context: str = "") -> Awaitable[ModbusPDU]:
        unit_id = self.config.unit_id
        return self._request(
            f"{context}read of registers {start}..{start + count - 1}",
            lambda c: c.read_holding_registers(start, count=count, device_id=unit_id),
        )

    # --- polling ---------------------------------------------------------------------------------

    async def _poll(self, *, resync: bool) -> None:
        self.polls_started += 1
        for read in self._reads:
            response = await self._read(read.start, read.count)
            at = self.now()
            words = list(response.registers)
            if response.isError() or len(words) != read.count:
                problem = (
                    f"refused with {_exception_name(response)}"
                    if response.isError()
                    else f"answered {len(words)} registers, expected {read.count}"
                )
                for station, offset, _ in read.stations:
                    base = read.start + offset
                    self._violate_station(station, f"read from register {base}: {problem}", at)
                continue
            for station, offset, capacity in read.stations:
                self._observe_block(station, words, offset, capacity, at, resync)

    def _observe_block(
        self, station: str, words: list[int], offset: int, capacity: int, at: float, resync: bool
    ) -> None:
        raw = words[offset : offset + block_words(capacity)]
        self._on_heartbeat(raw[H_HEARTBEAT], at)
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
                self._violate_station(station, f"{exc} at register {base + exc.offset}", at)
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
                self._observe(station, slot, status, at, resync=resync)

    def _field_at(self, station: str, slot: int, field: str) -> str:
        offset = S_ACK_SEQ if field == "ack_seq" else S_UNIT
        return f" at register {slot_base(self._base[station], slot) + offset}"

    def _violate_station(self, station: str, problem: str, at: float) -> None:
        self._raw.pop(station, None)  # decode the block again once it is back in the contract
        self._violate(station, None, problem, at)

    # --- commands ----------------------------------------------------------------------------

    async def command(
        self, station: str, slot: int, seq: int, code: Command, unit: int
    ) -> SlotStatus:
        """One write of the command area, then reads of the slot until it echoes ``seq``.

        Each phase has its own deadline of ``timeout_s``: waiting for the connection (restarted
        by every request ahead that finishes), each request's answer, and the echo (from the
        first answer without it). A steady slow round trip well under the deadline, or a queue
        of commands behind each other, costs no re-send.
        """
        self._slot_of(station, slot)
        where = f"{self.where} station '{station}' slot {slot}"
        words = encode_command(seq, code, unit)
        if not self.connected:
            raise PlcConnectionLost(f"{where}: not connected", plc=self.name, station=station)
        if code == Command.START and unit:
            # Before the write: a poll may show the unit before this coroutine resumes.
            self._guard.commanded((station, slot), unit)
        try:
            await self._write_command(station, slot, words)
            status = await self._read_slot(station, slot)
            # The echo's own deadline counts from the first answer without it: how long the
            # PLC takes to evaluate, not how long the reads wait for the connection.
            unechoed = self.now()
            while status.ack_seq != seq:
                if self.now() - unechoed > self.config.timeout_s:
                    raise self._timed_out(
                        f"station '{station}' slot {slot}: no echo of command "
                        f"{_command_name(code)} seq {seq} within {self.config.timeout_s} s",
                        unechoed,
                    )
                await asyncio.sleep(min(self.config.poll_interval_s, 0.01))
                status = await self._read_slot(station, slot)
        except ProtocolViolation as exc:
            # An answer outside the contract (an exception response, an undecodable echo): the
            # poll tells the station's violation; the command is unconfirmed, which the caller
            # handles by sending the same number again (never a crash of the line).
            raise PlcTimeout(
                f"{where}: command {_command_name(code)} seq {seq} unconfirmed: "
                f"{str(exc).removeprefix(where + ': ')}",
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
            message = self._failed(
                f"{what}: write of registers {address}..{end - 1} refused, not sent: "
                f"{self._outside_allow_list(address, end)}"
            )
            raise ProtocolViolation(message, plc=self.name, station=station)
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
