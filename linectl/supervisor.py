"""The supervisor: the dispatcher's decisions carried out against real PLCs.

It composes a ``Dispatcher`` (every decision, no I/O) with what it lacks: the drivers (one per
PLC) and the command tasks, all in one TaskGroup. It is the dispatcher's command port
(``send_start``, ``send_reset``): it sends each command until the PLC echoes its sequence
number and reports the outcome back; it turns driver events into slot
statuses for the dispatcher; and on start it puts the journal's open units back in the line
(recovery.py) and settles their open steps with the PLCs.

The line's state is the dispatcher's; the supervisor forwards the parts that the operator API,
metrics, the status board and tests read (``stations``, ``statistics()``, ``pause()``...).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from linectl.clock import Clock
from linectl.config import Line
from linectl.contract import Command, SlotStatus, is_newer
from linectl.dispatcher import Dispatcher
from linectl.drivers import make_driver
from linectl.drivers.base import (
    ConnectionChange,
    DriverEvent,
    PlcDriver,
    SlotUpdate,
    StationViolation,
)
from linectl.errors import CommandRefused, PlcConnectionLost, PlcTimeout
from linectl.journal import Journal
from linectl.linestate import Phase, Slot, Token
from linectl.recovery import restore

log = logging.getLogger("linectl.supervisor")

DriverFactory = Callable[..., PlcDriver]


def _forward(name: str, *, writable: bool = False) -> property:
    """A supervisor attribute that is its dispatcher's."""

    def get(self: Supervisor) -> Any:
        return getattr(self.dispatcher, name)

    def put(self: Supervisor, value: Any) -> None:
        setattr(self.dispatcher, name, value)

    return property(get, put if writable else None, doc=f"The dispatcher's ``{name}``.")


class Supervisor:
    """Runs one line. ``await run()`` until ``stop()`` (or until ``release.count`` units are done
    when ``exit_when_done``)."""

    def __init__(
        self,
        line: Line,
        *,
        journal: Journal | None = None,
        driver_factory: DriverFactory = make_driver,
        exit_when_done: bool = False,
        drain_timeout_s: float = 10.0,
        lease_check: Callable[[], None] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.dispatcher = Dispatcher(
            line, self, clock=clock, journal=journal, exit_when_done=exit_when_done
        )
        self.drain_timeout_s = drain_timeout_s
        # Called before every command; raises once this process may no longer own the line.
        self._lease_check = lease_check or (lambda: None)
        self._drivers: dict[str, PlcDriver] = {}
        self._driver_factory = driver_factory
        self._tg: asyncio.TaskGroup | None = None
        self._commands: set[asyncio.Task[None]] = set()

    # The line's state and the operator's controls, read and used through the supervisor.
    line = _forward("line", writable=True)  # a reload swaps the config
    max_wip = _forward("max_wip", writable=True)
    on_event = _forward("on_event", writable=True)
    flow = _forward("flow")
    clock = _forward("clock")
    journal = _forward("journal")
    events = _forward("events")
    stations = _forward("stations")
    units = _forward("units")
    quarantined = _forward("quarantined")
    paused = _forward("paused")
    released = _forward("released")
    recovered = _forward("recovered")
    finished = _forward("finished")
    rejected = _forward("rejected")
    next_unit_id = _forward("next_unit_id")
    finish_times = _forward("finish_times")
    lead_times = _forward("lead_times")
    passes = _forward("passes")
    statistics = _forward("statistics")
    current = _forward("current")
    check_invariants = _forward("check_invariants")
    now = _forward("now")
    wall = _forward("wall")
    kick = _forward("kick")
    pause = _forward("pause")
    set_in_service = _forward("set_in_service")
    release_quarantined = _forward("release_quarantined")
    wait_durable = _forward("wait_durable")

    # --- life cycle -------------------------------------------------------------------

    async def run(self) -> None:
        d = self.dispatcher
        d.clock.start()
        for st in d.stations.values():
            st.since = 0.0
        for name, plc in d.line.plcs.items():
            on_plc = {n: s for n, s in d.line.stations.items() if s.plc == name}
            self._drivers[name] = self._driver_factory(name, plc, on_plc, self._on_driver_event)
        d.next_unit_id = max(d.next_unit_id, await d.journal.next_unit_id())
        resumes = await self._recover()
        d.check_done()  # a restart may find every unit of release.count already done
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            background = [
                tg.create_task(drv.run(), name=f"driver-{n}") for n, drv in self._drivers.items()
            ]
            for tok, slot in resumes:
                self._spawn(self._resume(tok, slot))
            background.append(tg.create_task(d.run(), name="dispatch"))
            await d.wait_stopping()
            await self._drain()
            for task in [*self._commands, *background]:
                task.cancel()
            await d.journal.flush()
        self._tg = None

    def stop(self) -> None:
        """Stop releasing; let in-flight steps finish (``drain_timeout_s``), then return."""
        self.dispatcher.stop()

    async def _drain(self) -> None:
        d = self.dispatcher
        d.paused = True
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                while d.in_process():
                    await d.wait_change()
        except TimeoutError:
            busy = [f"{t.unit.serial}@{t.station}" for t in d.in_process()]
            log.warning("drain deadline passed; left in process (recoverable): %s", busy)

    # --- events from drivers ----------------------------------------------------------

    def _on_driver_event(self, event: DriverEvent) -> None:
        d = self.dispatcher
        at = d.clock.of_loop(event.at)  # drivers stamp events with the loop's clock
        if isinstance(event, SlotUpdate):
            st = d.stations[event.station]
            slot = st.slots[event.slot]
            if not st.violation and slot.status == event.status:
                # What a command's echo already showed (the driver's next read of the slot
                # repeats it): nothing changed, so no line-state update and no dispatch pass.
                return
            # A driver reports a violation once and then withholds the slot until its values
            # are back in the contract, so any update means the station is trustworthy again.
            st.violation = ""
            d.slot_changed(slot, event.status, at)
        elif isinstance(event, ConnectionChange):
            for st in d.stations.values():
                if st.plc == event.plc:
                    st.connected = event.connected
                    st.account(at)
                    kind = "connection_restored" if event.connected else "connection_lost"
                    d.journal.station_event(st.name, kind, d.wall(at), None, event.reason)
        elif isinstance(event, StationViolation):
            st = d.stations[event.station]
            st.violation = str(event.error)
            st.account(at)
            d.journal.station_event(st.name, "violation", d.wall(at), None, str(event.error))
        d.changed()

    # --- the dispatcher's command port ------------------------------------------------

    def send_start(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        self._spawn(self._start(tok, slot, previous))

    def send_reset(self, slot: Slot, seq: int) -> None:
        self._spawn(self._reset(slot, seq))

    def _spawn(self, coro) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _start(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        d = self.dispatcher
        st = slot.station
        unit = tok.unit
        driver = self._drivers[st.plc]
        # Write-ahead: the step is durable before the PLC can start it, so a restart knows.
        await d.journal.step_commanded(
            unit.id, st.name, slot.index, tok.attempt, tok.seq, d.wall(), self._entered(tok)
        )
        try:
            await self._command(driver, slot, tok.seq, Command.START, unit.id)
        except CommandRefused as exc:
            log.warning("%s", exc)
            d.start_refused(tok, slot, previous)
        else:
            d.start_confirmed(tok, slot, previous)

    def _entered(self, tok: Token) -> str | None:
        """``route-path=branch`` when this step is the first of a route branch, else None."""
        flow = self.dispatcher.flow
        node = flow.stations[tok.station]
        found = flow.route_of(tok.station)
        if found is None or node.index != 0 or node.parent is not found[0].branches[found[1]]:
            return None
        return f"{found[0].path}={found[1]}"

    async def _reset(self, slot: Slot, seq: int) -> None:
        d = self.dispatcher
        st = slot.station
        try:
            # Once reset, the PLC forgets the unit and its result: journal them durably first,
            # unless the unit moved on (the next step's durable intent implies this one passed).
            if slot.reset_waits_for_journal:
                await d.journal.sync()
            slot.reset_waits_for_journal = True
            await self._command(self._drivers[st.plc], slot, seq, Command.RESET, 0)
            d.journal.station_event(st.name, "reset", d.wall(), None, f"slot {slot.index}")
        except CommandRefused as exc:
            log.warning("%s", exc)
        finally:
            d.reset_done(slot)

    async def _command(
        self, driver: PlcDriver, slot: Slot, seq: int, code: Command, unit: int
    ) -> SlotStatus:
        """Send until the PLC echoes ``seq``. Re-sending the same sequence number is safe: the
        PLC evaluates it once. Waits out lost connections; the driver owns reconnecting."""
        st = slot.station
        delay = 0.01
        while True:
            self._lease_check()
            try:
                status = await driver.command(st.name, slot.index, seq, code, unit)
            except PlcConnectionLost:
                if driver.connected:
                    # The link broke and the driver has not noticed yet. Sleep rather than
                    # spin: a failure raised before any await would starve the loop, and with
                    # it the driver that is to notice.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                else:
                    await driver.wait_connected()
                continue
            except PlcTimeout as exc:
                log.info("%s; sending seq %d again", exc, seq)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.dispatcher.slot_changed(slot, status, self.dispatcher.now())
            return status

    # --- recovery after a restart -----------------------------------------------------

    async def _recover(self) -> list[tuple[Token, Slot]]:
        """Put the journal's open units back in the line; return the steps whose START must be
        settled with the PLC once it is connected."""
        store = self.dispatcher.journal.store
        if store is None:
            return []
        return restore(self.dispatcher, await store.open_units(), await store.operator_state())

    async def _resume(self, tok: Token, slot: Slot) -> None:
        """Settle a step that was commanded before the restart: await it if the PLC took it,
        send the same command again if the PLC never saw it."""
        d = self.dispatcher
        driver = self._drivers[slot.station.plc]
        await driver.wait_connected()  # the PLC's resync has been applied by now
        if tok.phase == Phase.COMMANDED and tok.slot is slot and tok.unit.status == "in_line":
            status = slot.status
            if status is not None and is_newer(status.ack_seq, tok.seq):
                slot.busy = False
                slot.occupant, tok.slot = None, None
                d.quarantine(
                    tok.unit,
                    f"outcome of step at {slot.station.name} unknown after restart (PLC at "
                    f"seq {status.ack_seq}, step was {tok.seq})",
                    d.now(),
                )
            else:
                await self._command(driver, slot, tok.seq, Command.START, tok.unit.id)
        slot.busy = False
        d.changed()

    def driver_statistics(self) -> list:
        return [drv.statistics() for drv in self._drivers.values()]
