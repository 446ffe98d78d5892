"""The one interface between linectl and a PLC, whatever protocol it speaks.

The supervisor sees stations only through ``PlcDriver``: it never imports pymodbus or asyncua.
A driver owns exactly one connection to one PLC (shared by all the stations on it) and is the
only owner of reconnecting it. It reports what it sees as events through a non-blocking sink.
"""

from __future__ import annotations

import abc
import asyncio
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from linectl.config import ModbusPlc, OpcUaPlc, Station
from linectl.contract import Command, SlotStatus, is_newer
from linectl.errors import ProtocolViolation


@dataclass(frozen=True, slots=True)
class SlotUpdate:
    """One slot's status changed (or was re-read after a (re)connect: ``resync``)."""

    plc: str
    station: str
    slot: int
    status: SlotStatus
    at: float  # event-loop time at which the driver observed it
    resync: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionChange:
    """The PLC became reachable (after a full re-read of its stations) or was lost."""

    plc: str
    connected: bool
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class StationViolation:
    """A station showed a value outside the contract; the supervisor treats it as faulted."""

    plc: str
    station: str
    slot: int | None
    error: ProtocolViolation
    at: float


DriverEvent = SlotUpdate | ConnectionChange | StationViolation
EventSink = Callable[[DriverEvent], None]


@dataclass(frozen=True, slots=True)
class DriverStatistics:
    plc: str
    protocol: str
    connected: bool
    requests: int  # requests sent (reads, writes, calls)
    errors: int  # requests that failed (timeout, exception response, lost connection)
    reconnects: int  # successful connects after the first
    request_seconds_total: float  # sum of request latencies, for a mean
    notifications: int = 0  # OPC UA data changes received
    since_connected_s: float | None = None
    last_error: str = ""


@dataclass
class Backoff:
    """Exponential backoff with jitter: the one schedule of a connection's retries."""

    initial: float
    maximum: float
    attempt: int = 0
    rng: Callable[[], float] = field(default=random.random)

    def next_delay(self) -> float:
        # The exponent is capped: 2**1024 overflows a float, which a PLC down for a few hours
        # (a thousand attempts) would otherwise reach, and the driver would die of it.
        ceiling = min(self.maximum, self.initial * (2 ** min(self.attempt, 64)))
        self.attempt += 1
        # Half fixed, half random: never zero (no hot loop), never synchronised across PLCs.
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.attempt = 0


SlotKey = tuple[str, int]  # (station, slot)


class SlotGuard:
    """The contract checks every driver makes of a slot's status, whatever the protocol: the
    echoed sequence number never goes back (serial-number arithmetic, so it may wrap), and a
    unit appears in a slot only if it was there at connect or linectl commanded it there."""

    RECENT_UNITS = 16  # units commanded per slot that may still show up

    def __init__(self) -> None:
        self._ack: dict[SlotKey, int] = {}
        self._units: dict[SlotKey, deque[int]] = {}

    def baseline(self, key: SlotKey, status: SlotStatus) -> None:
        """The first snapshot after a connect is the truth: the PLC may have restarted."""
        self._ack[key] = status.ack_seq
        units = self._units.setdefault(key, deque(maxlen=self.RECENT_UNITS))
        if status.unit:
            units.append(status.unit)

    def commanded(self, key: SlotKey, unit: int) -> None:
        """Call before sending a START: the status showing it may arrive before the answer."""
        if unit:
            self._units.setdefault(key, deque(maxlen=self.RECENT_UNITS)).append(unit)

    def check(self, key: SlotKey, status: SlotStatus) -> tuple[str, str] | None:
        """``None`` when ``status`` keeps the contract, else (field at fault, problem)."""
        if key not in self._ack:
            self.baseline(key, status)
            return None
        high = self._ack[key]
        if status.ack_seq != high and not is_newer(status.ack_seq, high):
            return "ack_seq", f"echoed sequence number went back from {high} to {status.ack_seq}"
        if status.unit and status.unit not in self._units.get(key, ()):
            return (
                "unit",
                f"unit {status.unit} was neither there at connect nor commanded by linectl",
            )
        self._ack[key] = status.ack_seq
        return None


class PlcDriver(abc.ABC):
    """One PLC's connection, its stations' statuses and their commands."""

    protocol: str

    def __init__(
        self,
        name: str,
        config: ModbusPlc | OpcUaPlc,
        stations: Mapping[str, Station],
        sink: EventSink,
    ) -> None:
        self.name = name
        self.config = config
        self.stations = dict(stations)  # only the stations on this PLC
        self._sink = sink
        self._connected = asyncio.Event()

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect, watch the stations and reconnect with backoff, until cancelled.

        Emits ``ConnectionChange(connected=True)`` only after a full read of every station, whose
        slots are emitted first as ``SlotUpdate(resync=True)``. Never returns on its own; never
        raises on a lost connection (it reports it and reconnects).
        """

    @abc.abstractmethod
    async def command(
        self, station: str, slot: int, seq: int, code: Command, unit: int
    ) -> SlotStatus:
        """Send one command and return the slot status in which the PLC echoes ``seq``.

        Raises PlcTimeout when no echo arrives within the request deadline (also when the PLC
        could not evaluate it, or answered outside the contract: the command is unconfirmed),
        PlcConnectionLost when not connected, CommandRefused when the PLC echoes ``seq`` with a
        refusal, and nothing else. Sending the same ``seq`` again is safe: the PLC runs a
        sequence number once.
        """

    @abc.abstractmethod
    def statistics(self) -> DriverStatistics: ...

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    @property
    def where(self) -> str:
        """How error messages name this PLC: ``plc 'cell_a' (127.0.0.1:15020)``."""
        return f"plc '{self.name}' ({self.config.where})"
