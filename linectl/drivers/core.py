"""What every driver shares, whatever carries the bytes: the connection's life, the poll
schedule, the heartbeat, statistics, and observe -> SlotGuard -> report once -> clear.

A protocol driver subclasses ``DriverCore`` and supplies only its transport: ``_open`` (connect),
``_read_all`` (one full read, feeding ``_observe`` and ``_on_heartbeat``), ``_follow`` (watch
until the connection is lost: polls or a subscription) and ``_close``. Every time is read from
the running event loop, so a driver runs the same under the live loop and under a virtual-time
loop that jumps to the next scheduled event (Home Assistant's DataUpdateCoordinator is the
model: an integration only fetches).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping

from linectl.config import ModbusPlc, OpcUaPlc, Station
from linectl.contract import SlotStatus
from linectl.drivers.base import (
    Backoff,
    ConnectionChange,
    DriverStatistics,
    EventSink,
    PlcDriver,
    SlotGuard,
    SlotKey,
    SlotUpdate,
    StationViolation,
)
from linectl.errors import PlcConnectionLost, PlcError, PlcTimeout, ProtocolViolation
from linectl.logpolicy import Reminder

log = logging.getLogger("linectl.drivers")

# One unanswered request may be a hiccup; this many in a row is a half-open connection.
MAX_CONSECUTIVE_TIMEOUTS = 2


def next_poll_at(due: float, now: float, interval: float) -> float:
    """When the poll after one due at ``due``, starting ``now``, is due: the first point of the
    grid ``due + k * interval`` after ``now``. Polls never overlap (the next waits for this one,
    starting at once if this one overran), a late poll takes its own grid point and the points
    it passed are skipped: never a burst to catch up, and the PLCs' jittered phases are kept."""
    if now < due + interval:
        return due + interval
    return due + (math.floor((now - due) / interval) + 1) * interval


class DriverCore(PlcDriver):
    """The machinery of one PLC connection; subclasses add only the protocol."""

    has_heartbeat = True  # whether a frozen heartbeat ends the connection

    def __init__(
        self,
        name: str,
        config: ModbusPlc | OpcUaPlc,
        stations: Mapping[str, Station],
        sink: EventSink,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(name, config, stations, sink)
        self._rng = rng
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, rng=rng)
        # What we last told, per slot (None: tell the next status whatever it is), and the
        # violations told and not yet cleared, per (station, slot) or (station, None).
        self._guard = SlotGuard()
        self._last: dict[SlotKey, SlotStatus | None] = {}
        self._violations: dict[tuple[str, int | None], str] = {}
        self._heartbeat: int | None = None
        self._heartbeat_at = 0.0
        self._consecutive_timeouts = 0
        self._down_since: float | None = None
        self._reminder = Reminder()
        # Statistics.
        self._requests = 0
        self._errors = 0
        self._connects = 0
        self._notifications = 0
        self._request_seconds = 0.0
        self._connected_at: float | None = None
        self._last_error = ""

    # --- what a protocol supplies ---------------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None:
        """Connect (or raise a PlcError saying why not)."""

    @abc.abstractmethod
    async def _read_all(self, *, resync: bool) -> None:
        """Read every station once, feeding ``_observe`` and ``_on_heartbeat``."""

    @abc.abstractmethod
    async def _follow(self) -> None:
        """Watch the connected PLC until the connection is lost: raise the PlcError saying why."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Drop the connection; must not raise."""

    def _slot_where(self, station: str, slot: int | None) -> str:
        """How a message names a station or slot; a protocol may name its node instead."""
        return f"{self.where} station '{station}'" + ("" if slot is None else f" slot {slot}")

    def _field_at(self, station: str, slot: int, field: str) -> str:
        """Where a slot's field lives, appended to a violation (Modbus: its register)."""
        return ""

    # --- time ---------------------------------------------------------------------------

    def now(self) -> float:
        """The running loop's time: live or virtual, every driver time is read here."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    # --- the connection's life ----------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Jitter the first connect so a hundred PLCs are not read in the same millisecond.
        await asyncio.sleep(self._rng() * self._first_delay_s())
        while True:
            try:
                await self._session()
            except* PlcError as group:
                self._lost(group.exceptions[0])
            await asyncio.sleep(self._backoff.next_delay())

    def _first_delay_s(self) -> float:
        return getattr(self.config, "poll_interval_s", 0.0)

    async def _session(self) -> None:
        """One connection from connect to loss; raises the PlcError that ended it."""
        try:
            await self._open()
            self._last.clear()
            self._violations.clear()
            self._heartbeat = None
            self._consecutive_timeouts = 0
            await self._read_all(resync=True)
            self._heartbeat_at = self.now()
            self._up()
            await self._follow()
        finally:
            self._connected.clear()
            self._connected_at = None
            await self._close()

    def _up(self) -> None:
        now = self.now()
        self._connects += 1
        if self._down_since is not None:
            log.warning(
                "%s recovered after %.1f s",
                self.where,
                now - self._down_since,
                extra={"plc": self.name},
            )
            self._down_since = None
        elif self._connects == 1:
            log.info("%s connected", self.where)
        self._connected_at = now
        self._connected.set()
        self._sink(ConnectionChange(self.name, True, "connected", now))

    def _lost(self, error: BaseException) -> None:
        """Tell a loss once per outage, with its reason, also when the very first connect fails
        (so the supervisor can say why a PLC is unreachable); a connect that keeps failing is
        logged at debug."""
        now = self.now()
        reason = str(error)
        self._last_error = reason
        detail = reason.removeprefix(f"{self.where}: ")
        if self._down_since is None:
            self._down_since = now
            self._reminder.start(now)
            what = "connection lost" if self._connects else "unreachable"
            log.warning("%s %s: %s", self.where, what, detail, extra={"plc": self.name})
            self._sink(ConnectionChange(self.name, False, reason, now))
        elif self._reminder.due(now):
            # Neither a line per attempt nor silence: again after 1 min, 2, 4 ... up to 1 h.
            log.warning(
                "%s still unreachable after %.0f s: %s",
                self.where,
                now - self._down_since,
                detail,
                extra={"plc": self.name},
            )
        else:
            log.debug("%s still unreachable: %s", self.where, detail)

    # --- polling and the heartbeat -------------------------------------------------------

    async def _poll_forever(self, poll: Callable[[], Awaitable[None]], interval: float) -> None:
        """Poll until the connection is lost, on the schedule of ``next_poll_at``."""
        next_at = self.now() + interval
        while True:
            delay = next_at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = next_poll_at(next_at, self.now(), interval)
            try:
                await poll()
            except PlcTimeout as exc:
                self._poll_done(exc)
            else:
                self._poll_done(None)

    def _poll_done(self, timeout: PlcTimeout | None) -> None:
        """After each poll, whoever schedules it: too many requests in a row without an answer
        (a half-open connection) or a frozen heartbeat end the connection (raised)."""
        if timeout is not None and self._consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS:
            raise PlcConnectionLost(
                f"{self.where}: no answer to {self._consecutive_timeouts} requests in a "
                f"row (half-open connection?)",
                plc=self.name,
            ) from timeout
        self._check_heartbeat()

    def _on_heartbeat(self, value: int | None, at: float) -> None:
        if value is None or value == self._heartbeat:
            return
        if self._heartbeat is not None:
            # A live heartbeat, not a mere connect, proves the PLC healthy: only now may the next
            # outage start again from the shortest delay (no flapping on a frozen PLC).
            self._backoff.reset()
        self._heartbeat, self._heartbeat_at = value, at

    def _check_heartbeat(self) -> None:
        """After a poll that was answered: a heartbeat unchanged too long is a lost PLC."""
        age = self.now() - self._heartbeat_at
        if self.has_heartbeat and age > self.config.heartbeat_timeout_s:
            raise PlcConnectionLost(
                f"{self.where}: heartbeat frozen at {self._heartbeat} for {age:.1f} s",
                plc=self.name,
            )

    async def _watch_heartbeat(self) -> None:
        """For a subscription, where no poll comes to check: wake when the heartbeat is due."""
        while True:
            due = self._heartbeat_at + self.config.heartbeat_timeout_s - self.now()
            if due < 0:
                self._check_heartbeat()
            await asyncio.sleep(max(due, 0.0) + 0.001)

    # --- requests ------------------------------------------------------------------------

    def _request_done(self, started: float) -> None:
        self._consecutive_timeouts = 0
        self._request_seconds += self.now() - started

    def _failed(self, message: str, *, started: float | None = None) -> str:
        """Count a failed request; returns the message, which names this PLC."""
        self._errors += 1
        if started is not None:
            self._request_seconds += self.now() - started
        self._last_error = message if message.startswith(self.where) else f"{self.where}: {message}"
        return self._last_error

    def _timed_out(self, message: str, started: float) -> PlcTimeout:
        self._consecutive_timeouts += 1
        return PlcTimeout(self._failed(message, started=started), plc=self.name)

    def _slot_of(self, station: str, slot: int) -> Station:
        """The station config of a command's target, or ValueError naming what is wrong."""
        config = self.stations.get(station)
        if config is None:
            raise ValueError(f"{self.where}: no station '{station}' on this PLC")
        if not 0 <= slot < config.capacity:
            raise ValueError(
                f"{self.where} station '{station}': slot {slot} outside 0..{config.capacity - 1}"
            )
        return config

    # --- observe -> guard -> report once -> clear ----------------------------------------

    def _observe(
        self, station: str, slot: int, status: SlotStatus, at: float, *, resync: bool = False
    ) -> None:
        """A decoded status of one slot: checked against the contract, told when it changed.

        A violation is told once; the next status within the contract clears it and is told
        even if it equals the last one told, so the supervisor un-faults the station.
        """
        key = (station, slot)
        if resync:
            self._guard.baseline(key, status)
        elif status == self._last.get(key):
            return  # unchanged (a violated slot's last is None): the common case, kept cheap
        problem = self._guard.check(key, status)
        if problem is not None:
            field, text = problem
            self._violate(station, slot, text + self._field_at(station, slot, field), at)
            return
        self._violations.pop((station, slot), None)
        if resync or status != self._last.get(key):
            self._last[key] = status
            self._sink(SlotUpdate(self.name, station, slot, status, at, resync=resync))

    def _violate(
        self, station: str, slot: int | None, problem: str, at: float, *, where: str = ""
    ) -> None:
        """Tell a contract violation once, until the value comes back into the contract."""
        message = f"{where or self._slot_where(station, slot)}: {problem}"
        if self._violations.get((station, slot)) == message:
            return
        self._violations[(station, slot)] = message
        # Tell the recovered status, whatever it is: the supervisor holds the station faulted
        # until it hears from the slot (from every slot, after a station-wide violation).
        slots = range(self.stations[station].capacity) if slot is None else (slot,)
        for s in slots:
            self._last[(station, s)] = None
        log.warning("%s", message)
        error = ProtocolViolation(message, plc=self.name, station=station)
        self._sink(StationViolation(self.name, station, slot, error, at))

    def _clear(self, station: str, slot: int | None) -> bool:
        """The station (``slot`` None: its header) is back in the contract."""
        return self._violations.pop((station, slot), None) is not None

    # --- statistics ----------------------------------------------------------------------

    def statistics(self) -> DriverStatistics:
        since = None
        if self._connected_at is not None and self._loop is not None:
            since = self._loop.time() - self._connected_at
        return DriverStatistics(
            plc=self.name,
            protocol=self.protocol,
            connected=self.connected,
            requests=self._requests,
            errors=self._errors,
            reconnects=max(self._connects - 1, 0),
            request_seconds_total=self._request_seconds,
            notifications=self._notifications,
            since_connected_s=since,
            last_error=self._last_error,
        )
