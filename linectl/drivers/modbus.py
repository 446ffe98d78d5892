"""The Modbus TCP driver: one connection per PLC, block reads, commands by echoed sequence number.

Registers are numbered as on the wire and in the config: 0-based holding register addresses
(register 104 is 40105 in the 4xxxx notation of some PLC tools). Error messages use that number.

The bytes are linectl.drivers.modbus_wire's: a plain asyncio protocol with one request in
flight, no library reconnect or retry, so every deadline is an ``asyncio.timeout`` scope of this
module and ``run()`` alone decides when to reconnect.

With ``tls`` configured the connection is Modbus/TCP Security: the same protocol over an SSL
context of linectl.tls (verification on, mutual auth), and TLS failures are told as such.
Whatever the transport, the driver writes nothing but the command areas of its stations
(``write_allow_list``); any other write is refused before it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Callable, Mapping

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
from linectl.drivers.modbus_wire import ModbusWire, Refusal, WireClosed, WireGarbled
from linectl.errors import (
    CommandRefused,
    ConfigError,
    PlcConnectionLost,
    PlcError,
    PlcTimeout,
    ProtocolViolation,
)
from linectl.security import PlcSecurityError
from linectl.tls import client_context, describe_tls_error

log = logging.getLogger(__name__)

__all__ = ["BlockRead", "ModbusDriver", "WriteArea", "plan_reads", "write_allow_list"]


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
        self._wire: ModbusWire | None = None
        self._lock = asyncio.Lock()  # one request at a time on the one connection
        self._finished = 0  # requests finished (answered or not) on this driver: progress
        self._raw: dict[str, list[int]] = {}  # each station's block as last decoded
        # What each poll's read is called in a message, built once.
        self._read_what = [
            f"read of registers {r.start}..{r.start + r.count - 1}" for r in self._reads
        ]
        self.polls_started = 0

    # --- the transport --------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            self._wire = await self._connect()
        except PlcError as exc:
            self._failed(str(exc))
            raise

    async def _read_all(self, *, resync: bool) -> None:
        self._raw.clear()
        await self._poll(resync=resync)

    async def _follow(self) -> None:
        await self._poll_forever(lambda: self._poll(resync=False), self.config.poll_interval_s)

    async def _close(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()

    async def _connect(self) -> ModbusWire:
        c = self.config
        sslctx: ssl.SSLContext | None = None
        if c.tls is not None:
            # Files are read at every connect, so rotated certificates take effect on reconnect.
            try:
                sslctx = client_context(c.tls, f"plcs.{self.name}.tls")
            except ConfigError as exc:
                raise PlcSecurityError(f"{self.where}: TLS: {exc}", plc=self.name) from exc
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
                    f"{self.where}: TLS handshake: no answer within {c.connect_timeout_s} s "
                    f"(a plaintext Modbus TCP port?)",
                    plc=self.name,
                ) from exc
            raise PlcConnectionLost(
                f"{self.where}: connect timeout after {c.connect_timeout_s} s", plc=self.name
            ) from exc
        except OSError as exc:
            wire.close()
            if isinstance(exc, ssl.SSLError) or tcp_up:
                # An SSLError's errno is OpenSSL's, not the system's: never os.strerror it.
                raise PlcSecurityError(
                    f"{self.where}: TLS: {describe_tls_error(exc)}", plc=self.name
                ) from exc
            # asyncio words it "Connect call failed (host, port)": say why, not where.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise PlcConnectionLost(f"{self.where}: connect failed: {why}", plc=self.name) from exc
        return wire

    def _closed_reason(self) -> str:
        """Why the connection ended, as far as we can tell."""
        wire = self._wire
        error = wire.error if wire is not None else None
        if isinstance(error, ssl.SSLError):
            return f"TLS: {describe_tls_error(error)}"
        if isinstance(error, WireGarbled):
            return f"protocol error: {error}"
        if wire is not None and wire.answered:
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

    # --- requests: the one place wire errors are translated ----------------------------------

    async def _request(
        self, what: str, send: Callable[[ModbusWire], asyncio.Future[object]]
    ) -> object:
        """One request on the one connection. Two deadlines of ``timeout_s`` each: waiting for
        the connection (``_acquire``), then this request's answer. A refusal (an exception
        response) is returned, counted as an error."""
        timeout = self.config.timeout_s
        await self._acquire(what)
        try:
            wire = self._wire
            if wire is None:
                raise PlcConnectionLost(f"{self.where}: {what}: not connected", plc=self.name)
            if wire.closed:
                raise PlcConnectionLost(
                    f"{self.where}: {what}: {self._closed_reason()}", plc=self.name
                )
            started = self.now()
            self._requests += 1
            try:
                async with asyncio.timeout(timeout):
                    answer = await send(wire)
            except TimeoutError as exc:
                raise self._timed_out(f"{what}: no answer within {timeout} s", started) from exc
            except WireGarbled as exc:
                message = self._failed(f"{what}: protocol error: {exc}", started=started)
                raise PlcConnectionLost(message, plc=self.name) from exc
            except WireClosed as exc:
                message = self._failed(
                    f"{what}: connection lost: {self._closed_reason()}", started=started
                )
                raise PlcConnectionLost(message, plc=self.name) from exc
            finally:
                self._finished += 1
        finally:
            self._lock.release()
        self._request_done(started)
        if isinstance(answer, Refusal):
            self._failed(f"{what}: refused with {answer}")
        return answer

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

    async def _read(self, first: int, count: int, what: str) -> list[int] | Refusal:
        answer = await self._request(what, lambda wire: wire.read(first, count))
        return answer  # type: ignore[return-value]

    # --- polling ---------------------------------------------------------------------------------

    async def _poll(self, *, resync: bool) -> None:
        self.polls_started += 1
        for read, what in zip(self._reads, self._read_what, strict=True):
            words = await self._read(read.start, read.count, what)
            at = self.now()
            if isinstance(words, Refusal) or len(words) != read.count:
                problem = (
                    f"refused with {words}"
                    if isinstance(words, Refusal)
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
        answer = await self._request(
            f"{what} at register {address}", lambda wire: wire.write(address, words)
        )
        if isinstance(answer, Refusal):
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
        what = (
            f"station '{station}' slot {slot}: read of registers {first}..{first + SLOT_WORDS - 1}"
        )
        words = await self._read(first, SLOT_WORDS, what)
        if isinstance(words, Refusal):
            raise ProtocolViolation(self._last_error, plc=self.name, station=station)
        try:
            return decode_slot_status(words, first - base)
        except ContractViolation as exc:
            raise ProtocolViolation(
                f"{self.where} station '{station}' slot {slot}: {exc} at register "
                f"{base + exc.offset}",
                plc=self.name,
                station=station,
            ) from exc
