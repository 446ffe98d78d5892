"""The supervisor: the dispatcher's decisions carried out against real PLCs.

It owns the drivers (one per PLC), the journal's writer task and the command tasks, all in one
TaskGroup; turns driver events into slot statuses for the dispatcher; sends each command until
the PLC echoes its sequence number; and, on start, puts the journal's open units back in the
line (see recovery.py) and settles their open steps with the PLCs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from linectl.config import Line
from linectl.contract import Command, SlotStatus, State, is_newer
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
from linectl.flow import resume_point
from linectl.journal import Journal
from linectl.linestate import Phase, Slot, Token, Unit
from linectl.recovery import ReplayError, replay

log = logging.getLogger("linectl.supervisor")

DriverFactory = Callable[..., PlcDriver]


class Supervisor(Dispatcher):
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
    ) -> None:
        super().__init__(line, journal=journal, exit_when_done=exit_when_done)
        self.drain_timeout_s = drain_timeout_s
        # Called before every command; raises once this process may no longer own the line.
        self._lease_check = lease_check or (lambda: None)
        self._drivers: dict[str, PlcDriver] = {}
        self._driver_factory = driver_factory
        self._tg: asyncio.TaskGroup | None = None
        self._commands: set[asyncio.Task[None]] = set()

    # --- life cycle -------------------------------------------------------------------

    async def run(self) -> None:
        self.clock.start()
        for st in self.stations.values():
            st.since = 0.0
        for name, plc in self.line.plcs.items():
            on_plc = {n: s for n, s in self.line.stations.items() if s.plc == name}
            self._drivers[name] = self._driver_factory(name, plc, on_plc, self._on_driver_event)
        self.next_unit_id = max(self.next_unit_id, await self.journal.next_unit_id())
        resumes = await self._recover()
        self._check_done()  # a restart may find every unit of release.count already done
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            background = [
                tg.create_task(d.run(), name=f"driver-{n}") for n, d in self._drivers.items()
            ]
            for tok, slot in resumes:
                self._spawn(self._resume(tok, slot))
            journal = tg.create_task(self.journal.run(), name="journal")
            background.append(tg.create_task(self._dispatch_loop(), name="dispatch"))
            await self._stopping.wait()
            await self._drain()
            for task in [*self._commands, *background]:
                task.cancel()
            # Commit what is journalled while the journal's task still runs: it is the one
            # that hands writes to the store, so flushing after cancelling it would wait forever.
            await self.journal.flush()
            journal.cancel()
        self._tg = None

    def stop(self) -> None:
        """Stop releasing; let in-flight steps finish (``drain_timeout_s``), then return."""
        self._stopping.set()
        self._kick.set()

    async def _drain(self) -> None:
        self.paused = True
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                while any(t.phase in (Phase.COMMANDED, Phase.RUNNING) for t in self._tokens()):
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            busy = [
                f"{t.unit.serial}@{t.station}"
                for t in self._tokens()
                if t.phase in (Phase.COMMANDED, Phase.RUNNING)
            ]
            log.warning("drain deadline passed; left in process (recoverable): %s", busy)

    async def _dispatch_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            self._dispatch()

    # --- events from drivers ----------------------------------------------------------

    def _on_driver_event(self, event: DriverEvent) -> None:
        at = self.clock.of_loop(event.at)  # drivers stamp events with the loop's clock
        if isinstance(event, SlotUpdate):
            st = self.stations[event.station]
            # A driver reports a violation once and then withholds the slot until its values
            # are back in the contract, so any update means the station is trustworthy again.
            st.violation = ""
            self._on_slot(st.slots[event.slot], event.status, at)
            st.last_state = st.slots[0].status.state if st.slots[0].status else State.UNDEFINED
        elif isinstance(event, ConnectionChange):
            for st in self.stations.values():
                if st.plc == event.plc:
                    st.connected = event.connected
                    st.account(at)
                    kind = "connection_restored" if event.connected else "connection_lost"
                    self.journal.station_event(
                        st.name, kind, self.wall(at), None, event.reason
                    )
        elif isinstance(event, StationViolation):
            st = self.stations[event.station]
            st.violation = str(event.error)
            st.account(at)
            self.journal.station_event(
                st.name, "violation", self.wall(at), None, str(event.error)
            )
        self._changed()

    # --- command tasks ----------------------------------------------------------------

    def _send_start(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        self._spawn(self._start(tok, slot, previous))

    def _send_reset(self, slot: Slot, seq: int) -> None:
        self._spawn(self._reset(slot, seq))

    def _spawn(self, coro) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _start(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        st = slot.station
        unit = tok.unit
        driver = self._drivers[st.plc]
        # Write-ahead: the step is durable before the PLC can start it, so a restart knows.
        await self.journal.step_commanded(
            unit.id, st.name, slot.index, tok.attempt, tok.seq, self.wall(), self._entered(tok)
        )
        try:
            await self._command(driver, slot, tok.seq, Command.START, unit.id)
        except CommandRefused as exc:
            log.warning("%s", exc)
            self._start_refused(tok, slot, previous)
        else:
            self._start_confirmed(tok, slot, previous)

    def _entered(self, tok: Token) -> str | None:
        """``route-path=branch`` when this step is the first of a route branch, else None."""
        node = self.flow.stations[tok.station]
        found = self.flow.route_of(tok.station)
        if found is None or node.index != 0 or node.parent is not found[0].branches[found[1]]:
            return None
        return f"{found[0].path}={found[1]}"

    async def _reset(self, slot: Slot, seq: int) -> None:
        st = slot.station
        try:
            # Once reset, the PLC forgets the unit and its result: journal them durably first,
            # unless the unit moved on (the next step's durable intent implies this one passed).
            if slot.reset_waits_for_journal:
                await self.journal.sync()
            slot.reset_waits_for_journal = True
            await self._command(self._drivers[st.plc], slot, seq, Command.RESET, 0)
            self.journal.station_event(st.name, "reset", self.wall(), None, f"slot {slot.index}")
        except CommandRefused as exc:
            log.warning("%s", exc)
        finally:
            self._reset_done(slot)

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
            self._on_slot(slot, status, self.now())
            return status

    # --- recovery after a restart -----------------------------------------------------

    async def _recover(self) -> list[tuple[Token, Slot]]:
        """Put the journal's open units back in the line; return the steps whose START must be
        settled with the PLC once it is connected."""
        store = self.journal.store
        if store is None:
            return []
        resumes: list[tuple[Token, Slot]] = []
        now = self.now()
        wall_now = self.wall(now)
        await self._restore_operator_state(store)
        for rec in await store.open_units():
            released = self.clock.of_wall(rec.released_at)
            unit = Unit(rec.unit_id, rec.serial, released)
            self.recovered += 1
            try:
                placed = replay(self.flow, list(rec.steps), rec.releases)
            except ReplayError as exc:
                placed = None
                error = exc
            if rec.status == "quarantined":
                unit.status, unit.reason = "quarantined", rec.reason or ""
                if placed is not None:
                    # So that a release after the restart goes back where it failed.
                    unit.attempts = placed.attempts
                    unit.attempts_at_release = placed.attempts_at_release
                    failed = self.flow.stations.get(placed.failed_at)
                    unit.resume = resume_point(failed) if failed is not None else None
                self.quarantined[unit.id] = unit
                continue
            self.units[unit.id] = unit
            if placed is None:
                self._quarantine(unit, f"cannot resume after restart: {error}", now)
                continue
            for step in placed.superseded:
                self.journal.step_finished(unit.id, step.station, step.attempt, wall_now, "pass")
            unit.attempts, unit.joins, unit.branches = (
                placed.attempts,
                placed.joins,
                placed.branches,
            )
            unit.attempts_at_release = placed.attempts_at_release
            misplaced = [
                p
                for p in placed.tokens
                if p.station
                and p.slot is not None
                and p.slot >= self.stations[p.station].config.capacity
            ]
            if misplaced:
                p = misplaced[0]
                self._quarantine(
                    unit,
                    f"cannot resume after restart: it is in slot {p.slot} of '{p.station}', "
                    f"which now has capacity {self.stations[p.station].config.capacity}",
                    now,
                )
                continue
            if placed.finished:
                self._finish_unit(unit, now)
                continue
            for p in placed.tokens:
                tok = Token(unit, p.target, forks=p.forks, seq=p.seq, attempt=p.attempt)
                unit.tokens.append(tok)
                if p.station and p.slot is not None:
                    slot = self.stations[p.station].slots[p.slot]
                    slot.occupant, tok.slot, tok.station = tok, slot, p.station
                    slot.next_seq = max(slot.next_seq, p.seq + 1)
                    if p.open:
                        tok.phase = Phase.COMMANDED
                        slot.busy = True
                        resumes.append((tok, slot))
                    else:
                        tok.phase = Phase.DONE
                if p.target is not None:
                    self._waiting.add(tok)
            if placed.rejected_at:
                failed = next((t for t in unit.tokens if t.station == placed.rejected_at), None)
                self._quarantine(unit, f"rejected at {placed.rejected_at}", now, failed=failed)
        if self.recovered:
            log.info(
                "resumed %d units in the line, %d in quarantine",
                len(self.units),
                len(self.quarantined),
            )
        return resumes

    async def _restore_operator_state(self, store) -> None:
        """Put back what the operator's journalled actions left in force: a paused line,
        stations out of service (a drained station must stay drained across a restart)."""
        state = await store.operator_state()
        self.paused = state.paused
        for name in sorted(state.out_of_service):
            if name in self.stations:
                self.stations[name].in_service = False
            else:
                log.warning(
                    "station '%s' was taken out of service but is no longer in the "
                    "config; ignoring that action",
                    name,
                )
        if state.paused or state.out_of_service:
            log.info(
                "operator actions in force: %s",
                ", ".join(
                    (["release paused"] if state.paused else [])
                    + [f"'{n}' out of service" for n in sorted(state.out_of_service)]
                ),
            )

    async def _resume(self, tok: Token, slot: Slot) -> None:
        """Settle a step that was commanded before the restart: await it if the PLC took it,
        send the same command again if the PLC never saw it."""
        driver = self._drivers[slot.station.plc]
        await driver.wait_connected()  # the PLC's resync has been applied by now
        if tok.phase == Phase.COMMANDED and tok.slot is slot and tok.unit.status == "in_line":
            status = slot.status
            if status is not None and is_newer(status.ack_seq, tok.seq):
                slot.busy = False
                slot.occupant, tok.slot = None, None
                self._quarantine(
                    tok.unit,
                    f"outcome of step at {slot.station.name} unknown after restart (PLC at "
                    f"seq {status.ack_seq}, step was {tok.seq})",
                    self.now(),
                )
            else:
                await self._command(driver, slot, tok.seq, Command.START, tok.unit.id)
        slot.busy = False
        self._changed()

    def driver_statistics(self) -> list:
        return [d.statistics() for d in self._drivers.values()]
