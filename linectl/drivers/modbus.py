"""The Modbus TCP driver: one connection per PLC, block reads, commands by echoed sequence number.

Registers are numbered as on the wire and in the config: 0-based holding register addresses
(register 104 is 40105 in the 4xxxx notation of some PLC tools). Error messages use that number.

The connection (plain, or Modbus/TCP Security with ``tls``) is linectl.drivers.modbus_wire's: no
library reconnect or retry, so every deadline is this module's (``asyncio.timeout`` scopes for
commands, one timer for the scheduled polls) and ``run()`` alone decides when to reconnect.
Whatever the transport, the driver writes nothing but the command areas of its stations
(``write_allow_list``); any other write is refused before it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
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
from linectl.drivers.core import DriverCore, next_poll_at
from linectl.drivers.modbus_map import (
    BlockRead,
    WriteArea,
    outside_allow_list,
    plan_reads,
    write_allow_list,
)
from linectl.drivers.modbus_wire import (
    ModbusWire,
    Refusal,
    Turn,
    WireError,
    WireGarbled,
    closed_reason,
    open_wire,
)
from linectl.errors import (
    CommandRefused,
    PlcConnectionLost,
    PlcError,
    PlcTimeout,
    ProtocolViolation,
)

log = logging.getLogger(__name__)

__all__ = ["BlockRead", "ModbusDriver", "WriteArea", "plan_reads", "write_allow_list"]


def _command_name(code: int) -> str:
    try:
        return Command(code).name
    except ValueError:
        return f"code {code}"


class ModbusDriver(DriverCore):
    """One Modbus TCP PLC: polls its station blocks, sends commands, reconnects with backoff.

    The connection's life, the first poll's jitter, the heartbeat and half-open checks and what
    is told to the supervisor are ``DriverCore``'s; this class reads and writes registers and
    schedules its polls from timers (``_follow``) on the grid of ``next_poll_at``.
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
        self._turn = Turn()  # one request at a time on the one connection
        # The scheduled poll (``_follow``): done with the error that ends the connection, the
        # next poll's time and timer, the read in flight, its deadline, a wait for the turn.
        self._polling: asyncio.Future[None] | None = None
        self._next_poll = 0.0
        self._poll_timer: asyncio.TimerHandle | None = None
        self._reading = 0  # which of this poll's reads
        self._read_started = 0.0
        self._in_flight: asyncio.Future[list[int] | Refusal] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._poll_turn: asyncio.Future[None] | None = None
        self._raw: dict[str, list[int]] = {}  # each station's block as last decoded
        # What each poll's read is called in a message, built once.
        self._read_what = [
            f"read of registers {r.start}..{r.start + r.count - 1}" for r in self._reads
        ]
        self.polls_started = 0

    # --- the transport --------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            self._wire = await open_wire(self.config, self.name, self.where)
        except PlcError as exc:
            self._failed(str(exc))
            raise

    async def _read_all(self, *, resync: bool) -> None:
        self._raw.clear()
        await self._poll(resync=resync)

    async def _follow(self) -> None:
        """Poll until the connection is lost (``_poll_done``), scheduled as DriverCore's
        ``_poll_forever`` does but from ``call_at`` timers and the answers' callbacks, so no task
        wakes up per poll: that was a quarter of a poll's CPU (bench/plcs.py, 1,000 PLCs). Each
        read still takes its turn on the connection and has its own deadline of ``timeout_s``."""
        loop = asyncio.get_running_loop()
        self._polling = polling = loop.create_future()
        self._next_poll = self.now() + self.config.poll_interval_s
        self._poll_timer = loop.call_at(self._next_poll, self._step, self._tick)
        try:
            await polling  # raises the PlcError that ended the connection
        finally:
            self._polling = None
            for handle in (self._poll_timer, self._deadline):
                if handle is not None:
                    handle.cancel()
            # Their callbacks, still to run, find themselves stale and give the turn back.
            for future in (self._in_flight, self._poll_turn):
                if future is not None:
                    future.cancel()
            self._poll_timer = self._deadline = self._in_flight = self._poll_turn = None

    async def _close(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()

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
            wire = self._usable_wire(what)
            started = self.now()
            self._requests += 1
            try:
                async with asyncio.timeout(timeout):
                    answer = await send(wire)
            except TimeoutError as exc:
                raise self._timed_out(f"{what}: no answer within {timeout} s", started) from exc
            except WireError as exc:
                raise self._wire_failed(what, exc, started) from exc
        finally:
            self._turn.give()
        self._answered(what, answer, started)
        return answer

    def _closed_reason(self) -> str:
        return closed_reason(self._wire, self.config, self.name)

    def _usable_wire(self, what: str) -> ModbusWire:
        wire = self._wire
        if wire is None:
            raise PlcConnectionLost(f"{self.where}: {what}: not connected", plc=self.name)
        if wire.closed:
            raise PlcConnectionLost(
                f"{self.where}: {what}: {self._closed_reason()}",
                plc=self.name,
            )
        return wire

    def _wire_failed(self, what: str, exc: WireError, started: float) -> PlcConnectionLost:
        if isinstance(exc, WireGarbled):
            message = f"{what}: protocol error: {exc}"
        else:
            message = f"{what}: connection lost: {self._closed_reason()}"
        return PlcConnectionLost(self._failed(message, started=started), plc=self.name)

    def _answered(self, what: str, answer: object, started: float) -> None:
        self._request_done(started)
        if isinstance(answer, Refusal):
            self._failed(f"{what}: refused with {answer}")

    async def _acquire(self, what: str) -> None:
        """Wait for the one connection, in turn. The deadline is ``timeout_s`` without progress:
        a request ahead that finishes restarts it (``Turn.acquire``)."""
        timeout = self.config.timeout_s
        waiting = self.now()
        if not await self._turn.acquire(timeout):
            message = f"{what}: waited {timeout} s behind a request that did not finish"
            raise PlcTimeout(self._failed(message, started=waiting), plc=self.name)

    async def _read(self, first: int, count: int, what: str) -> list[int] | Refusal:
        answer = await self._request(what, lambda wire: wire.read(first, count))
        return answer  # type: ignore[return-value]

    # --- polling ---------------------------------------------------------------------------------

    async def _poll(self, *, resync: bool) -> None:
        """One poll as a coroutine: the first, at connect, which resyncs every slot."""
        self.polls_started += 1
        for read, what in zip(self._reads, self._read_what, strict=True):
            words = await self._read(read.start, read.count, what)
            self._take_words(read, words, self.now(), resync)

    def _step(self, step: Callable[..., None], *args: object) -> None:
        """One step of the scheduled poll: what it raises ends the connection, raised by
        ``_follow`` as if a polling task had raised it."""
        polling = self._polling
        try:
            step(*args)
        except Exception as exc:  # handed to _follow's await: never lost
            if polling is not None and not polling.done():
                polling.set_exception(exc)
            else:
                raise

    def _tick(self) -> None:
        self._next_poll = next_poll_at(self._next_poll, self.now(), self.config.poll_interval_s)
        self.polls_started += 1
        self._reading = 0
        self._take_turn()

    def _take_turn(self) -> None:
        if self._turn.take():
            self._send_read()
        else:  # a command's request goes first
            self._poll_turn = self._turn.wait()
            self._poll_turn.add_done_callback(self._handed)

    def _handed(self, handed: asyncio.Future[None]) -> None:
        if handed is not self._poll_turn:  # the polls stopped meanwhile
            if not handed.cancelled():
                self._turn.give()
            return
        self._poll_turn = None
        self._step(self._send_read)

    def _send_read(self) -> None:
        """Send the current read of this poll; holds the turn until it is answered."""
        try:
            wire = self._usable_wire(self._read_what[self._reading])
        except PlcError:
            self._turn.give()
            raise
        read = self._reads[self._reading]
        self._requests += 1
        self._read_started = self.now()
        self._in_flight = answer = wire.read(read.start, read.count)
        if self._deadline is None:
            self._arm_deadline()
        answer.add_done_callback(self._read_done)

    def _arm_deadline(self) -> None:
        deadline = self._read_started + self.config.timeout_s
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_at(deadline, self._step, self._check_deadline)

    def _check_deadline(self) -> None:
        """The one deadline timer of the scheduled reads, left running from one read to the
        next (a timer per read was a tenth of a poll's CPU on uvloop): it fails the read in
        flight once that read's own deadline has passed, and otherwise waits for it."""
        self._deadline = None
        if self._in_flight is None:
            return  # answered: the next read arms it again
        if self.now() >= self._read_started + self.config.timeout_s:
            self._in_flight.cancel()  # _read_done tells the timeout
        else:
            self._arm_deadline()

    def _read_done(self, answer: asyncio.Future[list[int] | Refusal]) -> None:
        self._turn.give()
        if answer is not self._in_flight:  # the polls stopped meanwhile
            return
        self._in_flight = None
        self._step(self._take_read, answer)

    def _take_read(self, answer: asyncio.Future[list[int] | Refusal]) -> None:
        what, started = self._read_what[self._reading], self._read_started
        if answer.cancelled():  # its deadline
            timeout = self.config.timeout_s
            self._poll_done(self._timed_out(f"{what}: no answer within {timeout} s", started))
        else:
            error = answer.exception()
            if isinstance(error, WireError):
                raise self._wire_failed(what, error, started) from error
            words = answer.result()
            self._answered(what, words, started)
            read = self._reads[self._reading]
            self._take_words(read, words, self.now(), resync=False)
            self._reading += 1
            if self._reading < len(self._reads):
                self._take_turn()
                return
            self._poll_done(None)
        loop = asyncio.get_running_loop()
        self._poll_timer = loop.call_at(self._next_poll, self._step, self._tick)

    def _take_words(
        self, read: BlockRead, words: list[int] | Refusal, at: float, resync: bool
    ) -> None:
        if isinstance(words, Refusal) or len(words) != read.count:
            problem = (
                f"refused with {words}"
                if isinstance(words, Refusal)
                else f"answered {len(words)} registers, expected {read.count}"
            )
            for station, offset, _ in read.stations:
                base = read.start + offset
                self._violate_station(station, f"read from register {base}: {problem}", at)
            return
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
        outside = outside_allow_list(self._writable, address, end)
        if outside:
            message = self._failed(
                f"{what}: write of registers {address}..{end - 1} refused, not sent: {outside}"
            )
            raise ProtocolViolation(message, plc=self.name, station=station)
        answer = await self._request(
            f"{what} at register {address}", lambda wire: wire.write(address, words)
        )
        if isinstance(answer, Refusal):
            raise ProtocolViolation(self._last_error, plc=self.name, station=station)

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
