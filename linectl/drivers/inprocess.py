"""The in-process PLC driver: the bundled station program behind the driver interface, no sockets.

    factory = functools.partial(InProcessDriver, seed=7, time_scale=1.0)
    sup = Supervisor(line, driver_factory=factory)  # driver_factory(name, plc, stations, sink)

Each PLC of the line becomes a ``simulators.station.SimPlc`` in this process, running the very
program the Modbus and OPC UA simulators serve (docs/plc-interface.md: sequence numbers
evaluated once, PackML states, results, faults, RESET, cycle times drawn from each station's
``sim:`` section). Commands are evaluated at once; status changes reach the sink on the next
turn of the loop, through the same observe -> SlotGuard -> report-once path as the socket
drivers (``DriverCore``). The driver reads time only from the running loop and does no I/O, so
it runs unchanged under a virtual-time loop that jumps to the next scheduled event.

Options, all keywords:

- ``time_scale``: wall (loop) seconds per config second of a cycle; 1.0 for a virtual run,
  where cycle times are in line seconds.
- ``seed``: replaces every station's ``sim.seed``; station ``s`` draws from
  ``random.Random(f"{seed}:{s}")``, so replications with seeds 0, 1, 2... differ and each is
  repeatable. Without it a station uses its ``sim.seed``, else a seed derived from its name.
- ``scripts``: ``{station: iterable of ScriptedCycle(cycle_s, result, fault_code)}``, cycles to
  replay (a recorded run, for ``linectl replay``) in the order the station STARTs units, over
  all its slots. ``cycle_s`` is config seconds from START to Complete with ``result``
  (``Result.PASS`` / ``Result.REJECT``), or, when ``fault_code`` is non-zero, to Aborted with
  that code. A plain tuple ``(cycle_s, result, fault_code)`` works too. When a station's script
  ends it draws cycles from its ``sim:`` section again; pass ``itertools.cycle(steps)`` to
  repeat a script instead.

``executions()`` returns the PLC's execution counters: per (station, slot), how many cycles
each unit started there, for exactly-once checks against the trace. ``plc`` is the SimPlc, for
fault injection (``driver.plc.stations["a1"].fault(0)``); ``set_reachable(False)`` makes the
PLC unreachable (as a pulled cable) until ``set_reachable(True)``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterable, Mapping

from linectl.config import ModbusPlc, OpcUaPlc, Station
from linectl.contract import (
    CmdStatus,
    Command,
    ContractViolation,
    Result,
    SlotStatus,
    State,
    status_from_array,
    status_to_array,
)
from linectl.drivers.base import EventSink
from linectl.drivers.core import DriverCore
from linectl.errors import CommandRefused, PlcConnectionLost, PlcTimeout
from simulators.station import ScriptedCycle, SimPlc, SimStation

__all__ = ["InProcessDriver", "ScriptedCycle"]


class InProcessDriver(DriverCore):
    """One PLC simulated in this process, reached without a network."""

    protocol = "inprocess"
    has_heartbeat = False  # nothing between us and the PLC can freeze

    def __init__(
        self,
        name: str,
        config: ModbusPlc | OpcUaPlc,
        stations: Mapping[str, Station],
        sink: EventSink,
        *,
        time_scale: float = 1.0,
        seed: int | None = None,
        scripts: Mapping[str, Iterable[ScriptedCycle | tuple[float, int, int]]] | None = None,
    ) -> None:
        super().__init__(name, config, stations, sink)
        self.plc = SimPlc(name, self.stations, time_scale)
        for station_name, station in self.plc.stations.items():
            if seed is not None:
                station.rng = random.Random(f"{seed}:{station_name}")
        for station_name, script in (scripts or {}).items():
            if station_name not in self.plc.stations:
                raise ValueError(f"{self.where}: a script for station '{station_name}', not here")
            self.plc.stations[station_name].script = (ScriptedCycle(*step) for step in script)
        self._pending: set[tuple[str, int]] = set()
        self._reachable = asyncio.Event()
        self._reachable.set()
        self._unplugged = asyncio.Event()
        self.plc.on_change(self._changed)

    @property
    def where(self) -> str:
        return f"plc '{self.name}' (in-process)"

    def _first_delay_s(self) -> float:
        return 0.0

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self.plc.stop()  # no cycle timer outlives the driver

    def executions(self) -> dict[tuple[str, int], Counter[int]]:
        """Per (station, slot): how many cycles each unit started there."""
        return {
            (name, slot): Counter(counts)
            for name, station in self.plc.stations.items()
            for slot, counts in enumerate(station.slot_starts)
        }

    def set_reachable(self, reachable: bool) -> None:
        """Fault injection: the PLC drops off the network (False) or comes back (True)."""
        if reachable:
            self._unplugged.clear()
            self._reachable.set()
        else:
            self._reachable.clear()
            self._unplugged.set()

    # --- the transport: none ------------------------------------------------------------

    async def _open(self) -> None:
        if not self._reachable.is_set():
            raise PlcConnectionLost(f"{self.where}: unreachable", plc=self.name)

    async def _read_all(self, *, resync: bool) -> None:
        self._pending.clear()
        at = self.now()
        for station in self.plc.stations.values():
            for slot in range(station.capacity):
                self._read(station, slot, at, resync=resync)

    def _read(self, station: SimStation, slot: int, at: float, *, resync: bool = False) -> None:
        status = station.status(slot)
        if not (
            type(status.state) is State
            and type(status.result) is Result
            and type(status.cmd_status) is CmdStatus
        ):
            # Through the contract's decoding, so an out-of-contract value (a state code 99,
            # fault injection) is caught here as a socket driver's decoding catches it.
            try:
                status = status_from_array(status_to_array(status))
            except ContractViolation as exc:
                self._violate(station.name, slot, str(exc), at)
                return
        self._observe(station.name, slot, status, at, resync=resync)

    async def _follow(self) -> None:
        await self._unplugged.wait()
        raise PlcConnectionLost(f"{self.where}: unreachable", plc=self.name)

    async def _close(self) -> None:
        self._pending.clear()

    def _changed(self, station: SimStation, slot: int) -> None:
        # The program changes a slot several times in one scan (echo, state, unit): tell the
        # scan's outcome once, on the next turn of the loop, as a subscription would.
        key = (station.name, slot)
        if key in self._pending or self._loop is None:
            return
        self._pending.add(key)
        self._loop.call_soon(self._deliver, station, slot)

    def _deliver(self, station: SimStation, slot: int) -> None:
        key = (station.name, slot)
        if key not in self._pending:
            return  # a resync read it meanwhile
        self._pending.discard(key)
        if self.connected:
            self._notifications += 1
            self._read(station, slot, self.now())

    # --- commands -----------------------------------------------------------------------

    async def command(
        self, station: str, slot: int, seq: int, code: Command, unit: int
    ) -> SlotStatus:
        self._slot_of(station, slot)
        where = f"{self.where} station '{station}' slot {slot}"
        if not self.connected:
            raise PlcConnectionLost(f"{where}: not connected", plc=self.name, station=station)
        if code == Command.START and unit:
            self._guard.commanded((station, slot), unit)
        self._requests += 1
        status = self.plc.stations[station].command(slot, seq, int(code), unit)
        if status.ack_seq != seq:
            # A stale number (older than the PLC's echo) is never echoed: as on a socket, the
            # caller learns it only when its deadline passes.
            await asyncio.sleep(self.config.timeout_s)
            raise PlcTimeout(
                f"{where}: no echo of seq {seq} within {self.config.timeout_s} s "
                f"(the PLC is at seq {status.ack_seq})",
                plc=self.name,
                station=station,
            )
        if status.cmd_status != CmdStatus.ACCEPTED:
            raise CommandRefused(
                f"{where}: command {code.name} seq {seq} refused: {status.cmd_status.name}",
                plc=self.name,
                station=station,
            )
        return status
