"""The dispatcher: what the supervisor decides, without any I/O of its own.

It holds the line's state (units and their tokens, stations and their slots), turns each slot
status a PLC reports into what happens to the unit there, and moves every token that can move.
Commands leave through a port, ``Commands`` (``send_start``, ``send_reset``), which the
supervisor implements with drivers and tasks and a test with a list; what comes back enters
through the public methods ``slot_changed``, ``start_confirmed``, ``start_refused`` and
``reset_done``. The journal receives the record of each decision.

All state is changed only from the event loop's thread, so no locks are needed. Time is line
time, read from the clock it is handed (clock.py); wall-clock time exists only in the journal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from linectl.clock import Clock
from linectl.config import Line
from linectl.contract import CmdStatus, Result, SlotStatus, State
from linectl.events import EventHub, LineChanged, StationChanged, UnitChanged
from linectl.flow import (
    CompiledFlow,
    Exit,
    ForkNode,
    Join,
    Node,
    RouteNode,
    StationNode,
    compile_flow,
    next_after,
    resume_point,
)
from linectl.histogram import Histogram
from linectl.journal import Journal
from linectl.linestate import (
    Phase,
    Recent,
    Slot,
    StationState,
    StationStatistics,
    SupervisorStatistics,
    Token,
    Unit,
)
from linectl.policies import BranchView, RouteState, choose, commit
from linectl.waiting import Waiting

log = logging.getLogger("linectl.supervisor")

# Policies that choose among branches with room now; the others keep strict turns.
WORK_CONSERVING = frozenset({"least_loaded", "shortest_expected"})


class Commands(Protocol):
    """Where the dispatcher's commands go (the supervisor's drivers and tasks)."""

    def send_start(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        """Journal the step durably, START it on ``slot`` until echoed, then call
        ``start_confirmed`` (or ``start_refused``)."""

    def send_reset(self, slot: Slot, seq: int) -> None:
        """RESET ``slot`` with ``seq``, then call ``reset_done``."""


class _NoCommands:
    """For a dispatcher that is only read (statistics of a line that does not run)."""

    def send_start(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        raise RuntimeError("this dispatcher has no command port")

    def send_reset(self, slot: Slot, seq: int) -> None:
        raise RuntimeError("this dispatcher has no command port")


class Dispatcher:
    """The line's state and every decision about it; the supervisor adds the I/O."""

    def __init__(
        self,
        line: Line,
        commands: Commands | None = None,
        *,
        clock: Clock | None = None,
        journal: Journal | None = None,
        exit_when_done: bool = False,
    ) -> None:
        self.line = line
        self.commands: Commands = commands or _NoCommands()
        # Simulated PLCs may run faster than life (time_scale); the engine sees line time only.
        self.clock = clock or Clock(line.time_scale)
        self.flow: CompiledFlow = compile_flow(line)
        self.journal = journal or Journal()
        self.exit_when_done = exit_when_done
        self.stations = {
            name: StationState(name, cfg, cfg.plc) for name, cfg in line.stations.items()
        }
        self._owed: dict[Slot, None] = {}  # slots owing a RESET, line-wide
        self._held: dict[Slot, None] = {}  # slots in a refusal backoff
        self._touched: dict[StationState, None] = {}  # stations changed since the last pass
        for st in self.stations.values():
            st.owed = self._owed
            st.changed = self._touched
        self.events = EventHub()
        self._line_seen: tuple[int, int, int, int, bool] | None = None
        # What the last event of each station showed (its ``_picture``), while anyone listens.
        self._shown: dict[StationState, tuple] = {}
        self.max_wip = line.release.max_wip or sum(s.capacity for s in line.stations.values())
        self.units: dict[int, Unit] = {}  # in the line
        self.quarantined: dict[int, Unit] = {}
        self.paused = False
        self.next_unit_id = 1
        self.released = 0
        self.recovered = 0  # units found in the line or in quarantine at start
        self.finished = 0
        self.rejected = 0
        self.quarantine_count = 0
        self.finish_times = Recent()
        self.lead_times = Recent()
        self.handovers = Recent()
        self.lead_hist = Histogram()
        self.handover_hist = Histogram()
        # Called after every dispatch pass (every change is followed by one): tests hook
        # invariant checks here, ``linectl compare`` its recorder.
        self.on_event: Callable[[], None] | None = None
        self._route_state: dict[int, RouteState] = {id(r): RouteState() for r in self.flow.routes}
        self._waiting = Waiting()  # tokens with somewhere to go, queued per target
        # A pass is due (``kick``), and the call that runs it once the loop gets to it; the
        # future ``run`` waits on, which a failing pass fails.
        self._due = False
        self._pass_call: asyncio.Handle | None = None
        self._running: asyncio.Future[None] | None = None
        self._stopping = asyncio.Event()
        self._change = asyncio.Event()  # set on every change, for whoever waits for one
        self._last_release = -float("inf")
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = 0.0  # line time of ``_wake``
        # Per dispatch pass and number of moves made in it, what routes look like; a route's
        # branches are looked at once per state, not once per waiting token.
        self._pass = 0
        self._moves = 0
        self._views: dict[tuple[int, int, int], list[BranchView]] = {}
        self._members: dict[int, list[list[StationState]]] = {}  # route -> its branches' stations
        self._blocked: set[tuple[int, int, int]] = set()

    # --- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch passes until cancelled: one in the turn of the event loop after anything
        changed, however many changes arrived in the turn before (``kick``)."""
        self._running = asyncio.get_running_loop().create_future()
        try:
            if self._due:
                self._scheduled_pass()
            await self._running
        finally:
            if self._pass_call is not None:
                self._pass_call.cancel()
                self._pass_call = None
            self._running = None

    def _scheduled_pass(self) -> None:
        self._pass_call = None
        if self._running is None or self._running.done():
            # ``run`` was cancelled (cancelling its task cancels the future it waits on at
            # once): no pass after that, as none could follow a cancelled task's last await.
            return
        self._due = False
        try:
            self.dispatch()
        except Exception as exc:  # raised by ``run``, so the supervisor's TaskGroup sees it
            if self._running is not None and not self._running.done():
                self._running.set_exception(exc)

    def stop(self) -> None:
        """Stop releasing units (the supervisor then drains what is in process)."""
        self._stopping.set()
        self.kick()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopping(self) -> None:
        await self._stopping.wait()

    async def wait_change(self) -> None:
        """Return at the next change of the line's state."""
        self._change.clear()
        await self._change.wait()

    def in_process(self) -> list[Token]:
        """Tokens whose step a PLC has been commanded or is working on."""
        return [t for t in self.tokens() if t.phase in (Phase.COMMANDED, Phase.RUNNING)]

    def want(self, tok: Token) -> None:
        """Queue ``tok`` for ``tok.target`` (a unit put back by recovery)."""
        self._waiting.add(tok)

    # --- clocks -----------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.now()

    def wall(self, t: float | None = None) -> datetime:
        return self.clock.wall(t)

    # --- a slot's status --------------------------------------------------------------

    def slot_changed(self, slot: Slot, status: SlotStatus, at: float) -> None:
        previous = slot.status
        slot.seen(status)
        st = slot.station
        if status.state == State.IDLE and (previous is None or previous.state != State.IDLE):
            slot.idle_since = at
        # (The hot path's journal writes are skipped whole with no store: their wall-clock
        # times and texts cost more than the rest of the update.)
        if self.journal.recording and (previous is None or previous.state != status.state):
            self.journal.station_event(
                st.name,
                "state",
                self.wall(at),
                int(status.state),
                f"slot {slot.index} unit {status.unit}",
            )
        tok = slot.occupant
        if tok is not None and tok.phase in (Phase.COMMANDED, Phase.RUNNING):
            ours = (
                status.ack_seq == tok.seq
                and status.cmd_status == CmdStatus.ACCEPTED
                and status.unit == tok.unit.id
            )
            if ours:
                if tok.phase == Phase.COMMANDED and status.state in (
                    State.EXECUTE,
                    State.COMPLETE,
                    State.ABORTED,
                ):
                    tok.phase = Phase.RUNNING
                    if self.journal.recording:
                        self.journal.step_accepted(tok.unit.id, st.name, tok.attempt, self.wall(at))
                if status.state == State.COMPLETE:
                    self._finished(tok, status, at)
                elif status.state == State.ABORTED:
                    self._faulted(tok, status, at)
            elif tok.phase == Phase.RUNNING:
                self._lost(tok, status, at)
        elif tok is None and not slot.busy and not slot.needs_reset:
            if status.state in (State.COMPLETE, State.ABORTED):
                # Not a unit we hold here (handed on, dropped, or from before a restart).
                slot.needs_reset = True
                if status.state == State.ABORTED:
                    slot.reset_at = at + self._reset_backoff(st)
        st.account(at)

    # --- a step ends ------------------------------------------------------------------

    def _finished(self, tok: Token, status: SlotStatus, at: float) -> None:
        st = tok.slot.station  # type: ignore[union-attr]
        unit = tok.unit
        st.cycles += 1
        st.consecutive_faults = 0
        if status.cycle_time_ms:
            st.observe_cycle(status.cycle_time_ms / 1000)
            # The PLC's own measurement, in its (the line's) seconds.
            st.cycle_hist.observe(status.cycle_time_ms / 1000, unit.serial)
        rejected = status.result == Result.REJECT
        if rejected:
            st.rejected += 1
        else:
            st.passed += 1
        if self.journal.recording:
            self.journal.step_finished(
                unit.id,
                st.name,
                tok.attempt,
                self.wall(at),
                "reject" if rejected else "pass",
                0,
                status.cycle_time_ms / 1000 if status.cycle_time_ms else None,
            )
        if tok.discard or unit.status != "in_line":
            self._vacate(tok)
            self._drop(tok)
            return
        node = self.flow.stations[st.name]
        if rejected and node.on_reject is None:
            self.rejected += 1
            self.quarantine(unit, f"rejected at {st.name}", at, failed=tok)
            return
        tok.phase = Phase.DONE
        tok.done_at = at
        if rejected:
            log.info(
                "unit %s rejected at %s: to rework at %s",
                unit.serial,
                st.name,
                node.on_reject.station,
            )
            self._advance(tok, node.on_reject, at)
        else:
            self._advance(tok, next_after(node), at)

    def _advance(self, tok: Token, where: Node | Join | Exit, at: float) -> None:
        """Send a token that is done with its current place to ``where``."""
        unit = tok.unit
        if isinstance(where, Exit):
            self._vacate(tok)
            self._drop(tok)
            self.finish_unit(unit, at)
        elif isinstance(where, Join):
            self._vacate(tok)
            self._drop(tok)
            key = id(where.fork)
            unit.joins[key] = unit.joins.get(key, 0) + 1
            if unit.joins[key] == len(where.fork.branches):
                del unit.joins[key]
                joined = Token(unit, None, forks=tok.forks[:-1])
                joined.done_at = at
                unit.tokens.append(joined)
                self._advance(joined, next_after(where.fork), at)
        else:
            tok.target = where
            self._waiting.add(tok)

    def _faulted(self, tok: Token, status: SlotStatus, at: float) -> None:
        slot = tok.slot
        assert slot is not None
        st = slot.station
        unit = tok.unit
        st.faults += 1
        st.consecutive_faults += 1
        self.journal.step_finished(
            unit.id, st.name, tok.attempt, self.wall(at), "fault", status.fault_code, None
        )
        self.journal.station_event(
            st.name,
            "fault",
            self.wall(at),
            int(State.ABORTED),
            f"fault code {status.fault_code} with unit {unit.serial}",
        )
        log.warning(
            "station '%s' faulted (code %d) with unit %s",
            st.name,
            status.fault_code,
            unit.serial,
            extra={"station": st.name, "unit": unit.serial, "plc": st.plc},
        )
        slot.occupant = None
        slot.needs_reset = True
        slot.reset_at = at + self._reset_backoff(st)
        self._retry(
            tok,
            f"faulted {tok.attempt} times at {st.name} (last fault code {status.fault_code})",
            at,
        )

    def _lost(self, tok: Token, status: SlotStatus, at: float) -> None:
        """The PLC no longer shows the unit it was working on (it restarted, or was reset by
        hand): the step's outcome is unknown, so it is tried again like a faulted one."""
        slot = tok.slot
        assert slot is not None
        st = slot.station
        unit = tok.unit
        log.warning(
            "station '%s' lost unit %s (PLC shows seq %d, unit %d); trying it again",
            st.name,
            unit.serial,
            status.ack_seq,
            status.unit,
            extra={"station": st.name, "unit": unit.serial, "plc": st.plc},
        )
        self.journal.step_finished(unit.id, st.name, tok.attempt, self.wall(at), "abandoned")
        slot.occupant = None
        st.account(at)
        self._retry(tok, f"lost {tok.attempt} times at {st.name} (PLC restarted?)", at)

    def _retry(self, tok: Token, reason: str, at: float) -> None:
        """Send a token whose step failed back to try again, or quarantine its unit."""
        unit = tok.unit
        station = tok.station
        tok.slot = None
        tok.phase = Phase.WAITING
        if tok.discard or unit.status != "in_line":
            self._drop(tok)
            return
        node = self.flow.stations[station]
        if tok.attempt - unit.attempts_at_release.get(station, 0) >= self.line.retry.attempts:
            self.quarantine(unit, reason, at, failed=tok, node=node)
            return
        route = self.flow.route_of(station)
        # The first station of a route branch: try the unit on whichever branch is up.
        if route is not None and node.parent is route[0].branches[route[1]] and node.index == 0:
            tok.target = route[0]
        else:
            tok.target = node
        self._waiting.add(tok)

    def _reset_backoff(self, st: StationState) -> float:
        retry = self.line.retry
        n = max(st.consecutive_faults, 1)
        return min(retry.backoff_s * 2 ** (n - 1), retry.backoff_max_s)

    def _vacate(self, tok: Token) -> None:
        """The token leaves its slot: the PLC is owed a RESET to hand the slot back."""
        slot = tok.slot
        if slot is not None:
            slot.occupant = None
            slot.needs_reset = True
            tok.slot = None
            slot.station.account(self.now())

    def _drop(self, tok: Token) -> None:
        self._waiting.discard(tok)
        if tok in tok.unit.tokens:
            tok.unit.tokens.remove(tok)

    def finish_unit(self, unit: Unit, at: float) -> None:
        unit.status = "finished"
        unit.finished_at = at
        del self.units[unit.id]
        self.finished += 1
        self.finish_times.append(at)
        self.lead_times.append(at - unit.released_at)
        self.lead_hist.observe(at - unit.released_at, unit.serial)
        if self.journal.recording:
            self.journal.unit_finished(unit.id, self.wall(at))
        self._unit_event("finished", unit, at)
        self.check_done()

    def quarantine(
        self,
        unit: Unit,
        reason: str,
        at: float,
        *,
        failed: Token | None = None,
        node: Node | None = None,
    ) -> None:
        log.warning(
            "unit %s quarantined: %s",
            unit.serial,
            reason,
            extra={"unit": unit.serial, "station": failed.station if failed else None},
        )
        unit.status = "quarantined"
        unit.reason = reason
        if failed is not None and failed.slot is not None:
            self._vacate(failed)
        where = node or (self.flow.stations[failed.station] if failed is not None else None)
        unit.resume = resume_point(where) if where is not None else None
        for tok in list(unit.tokens):
            if tok.phase in (Phase.COMMANDED, Phase.RUNNING) and tok.slot is not None:
                tok.discard = True  # let the PLC finish the cycle, then drop the token
            else:
                self._vacate(tok)
                self._drop(tok)
        del self.units[unit.id]
        self.quarantined[unit.id] = unit
        self.quarantine_count += 1
        self.journal.unit_quarantined(unit.id, reason, self.wall(at))
        self._unit_event("quarantined", unit, at, reason=reason)
        self.check_done()

    def release_quarantined(self, unit_id: int, detail: str = "operator") -> Unit:
        """Put a quarantined unit back into the line at the station where it failed (the
        whole fork, if it failed inside one), with its next attempt number there."""
        unit = self.quarantined.pop(unit_id)
        if any(t.slot is not None for t in unit.tokens):
            self.quarantined[unit_id] = unit
            raise ValueError(f"unit {unit.serial} is still finishing a cycle; try again")
        unit.status = "in_line"
        # Attempt numbers go on (each names a row of the trace); retries count from here.
        unit.attempts_at_release = dict(unit.attempts)
        unit.joins.clear()
        unit.tokens.clear()
        self.units[unit.id] = unit
        tok = Token(unit, unit.resume or self.flow.root.steps[0])
        unit.tokens.append(tok)
        self._waiting.add(tok)
        wall = self.wall()
        self.journal.operator_action("release", unit.serial, wall, detail)
        self.journal.quarantine_released(unit.id, wall)
        self._unit_event("quarantine_released", unit, self.now())
        self.changed()
        return unit

    def check_done(self) -> None:
        count = self.line.release.count
        if (
            self.exit_when_done
            and count is not None
            and not self._release_left()
            and not self.units
            and not any(t.slot for u in self.quarantined.values() for t in u.tokens)
        ):
            self.stop()

    # --- dispatch ---------------------------------------------------------------------

    @property
    def passes(self) -> int:
        """Dispatch passes so far: the service watchdog pings only while they go on."""
        return self._pass

    def _woken(self) -> None:
        self._wake = None
        self.kick()

    def kick(self) -> None:
        """Ask for a dispatch pass (also the service watchdog's probe of the dispatch loop).
        Passes asked for in one turn of the event loop are one pass, in the next turn."""
        self._due = True
        if self._pass_call is None and self._running is not None:
            self._pass_call = self._running.get_loop().call_soon(self._scheduled_pass)

    def changed(self) -> None:
        self._change.set()
        self.kick()

    def dispatch(self) -> None:
        now = self.now()
        next_wake = float("inf")
        self._pass += 1
        self._views.clear()
        self._blocked.clear()
        for slot in list(self._owed) if self._owed else ():
            if slot.busy or not slot.station.connected:
                continue
            if now >= slot.reset_at:
                slot.busy = True
                slot.needs_reset = False
                self.commands.send_reset(slot, slot.take_seq())
            else:
                next_wake = min(next_wake, slot.reset_at)
        for slot in list(self._held) if self._held else ():
            if now >= slot.held_until:
                slot.held_until = 0.0
                del self._held[slot]
            else:
                next_wake = min(next_wake, slot.held_until)
        for queue in self._waiting.queues():
            for tok in queue:
                # A token may have moved already (the fork that split its sibling).
                if tok in self._waiting and not self._try_move(tok):
                    break
        while self._may_release(now):
            self._release(now)
        interval = self.line.release.interval_s
        if interval and not self.paused and self._release_left():
            next_wake = min(next_wake, self._last_release + interval)
        if self._wake is not None and self._wake_at != next_wake:
            self._wake.cancel()
            self._wake = None
        if self._wake is None and next_wake < float("inf"):
            # (Most passes ask for the wake-up the pass before asked for: it stays.)
            self._wake = self.clock.call_at(next_wake, self._woken)
            self._wake_at = next_wake
        self._publish(now)
        if self.on_event is not None:
            self.on_event()

    # --- events for watchers ----------------------------------------------------------------

    def _unit_event(self, kind: str, unit: Unit, at: float, *, reason: str = "") -> None:
        if self.events.active:
            station = next((t.station for t in unit.tokens if t.station), "")
            self.events.publish(
                UnitChanged(kind, unit.id, unit.serial, station, reason, at, self.wall(at))
            )

    def _publish(self, now: float) -> None:
        """One event per station that changed in this pass, and the line's counts if they did."""
        if not self.events.active:
            self._touched.clear()
            self._shown.clear()
            return
        wall = self.wall(now)
        at = now
        for st in self._touched:
            # A station touched but showing what its last event showed (a status that
            # changed and changed back, a re-count that counted the same) is not news.
            picture = self._picture(st)
            if self._shown.get(st) != picture:
                self._shown[st] = picture
                self.events.publish(self._station_event(st, at, wall, picture))
        self._touched.clear()
        counts = self._counts()
        if counts != self._line_seen:
            self._line_seen = counts
            self.events.publish(LineChanged(*counts, at=at, wall=wall))

    def current(self) -> tuple[LineChanged, dict[str, StationChanged]]:
        """The line and every station as events would show them now: what a watcher that
        subscribes late starts from (a birth certificate, the first page of a view)."""
        now = self.now()
        wall = self.wall(now)
        # The watcher starts from this picture, which may be newer than the last events: the
        # next pass tells every station it touches, whatever its last event showed.
        self._shown.clear()
        stations = {
            n: self._station_event(st, now, wall, self._picture(st))
            for n, st in self.stations.items()
        }
        return LineChanged(*self._counts(), at=now, wall=wall), stations

    def _counts(self) -> tuple[int, int, int, int, bool]:
        released = self.released + self.recovered
        return released, self.finished, len(self.quarantined), len(self.units), self.paused

    @staticmethod
    def _picture(st: StationState) -> tuple:
        """What a station's event shows, but its time: ``_station_event``'s fields in order."""
        status = st.slots[0].status
        state = status.state if status is not None else State.UNDEFINED
        return (
            st.condition.value,
            state,
            tuple(s.occupant.unit.serial for s in st.slots if s.occupant),
            st.load(),
            st.config.capacity,
            st.in_service,
            st.connected,
            st.cycles,
            st.passed,
            st.rejected,
            st.faults,
        )

    @staticmethod
    def _station_event(
        st: StationState, at: float, wall: datetime, picture: tuple
    ) -> StationChanged:
        condition, state, units, load, capacity, in_service, connected, *counts = picture
        cycles, passed, rejected, faults = counts
        return StationChanged(
            station=st.name,
            condition=condition,
            state=int(state),
            state_name=state.label,
            units=units,
            load=load,
            capacity=capacity,
            in_service=in_service,
            connected=connected,
            cycles=cycles,
            passed=passed,
            rejected=rejected,
            faults=faults,
            at=at,
            wall=wall,
        )

    def _release_left(self) -> bool:
        count = self.line.release.count
        # Unit ids are never reused, so they count releases across restarts too.
        return count is None or self.next_unit_id - 1 < count

    def _may_release(self, now: float) -> bool:
        if self.paused or self._stopping.is_set() or not self._release_left():
            return False
        if len(self.units) >= self.max_wip:
            return False
        interval = self.line.release.interval_s
        if interval and now < self._last_release + interval:
            return False
        return self._can_enter(self.flow.root.steps[0])

    def _release(self, now: float) -> None:
        uid = self.next_unit_id
        self.next_unit_id += 1
        unit = Unit(uid, f"{self.line.line}-{uid:06d}", now)
        self.units[uid] = unit
        self.released += 1
        self._last_release = now
        if self.journal.recording:
            self.journal.unit_released(uid, unit.serial, self.wall(now))
        self._unit_event("released", unit, now)
        tok = Token(unit, self.flow.root.steps[0])
        unit.tokens.append(tok)
        self._waiting.add(tok)
        self._try_move(tok)

    def _can_enter(self, node: Node) -> bool:
        if isinstance(node, StationNode):
            return self.stations[node.station].free_slot() is not None
        if isinstance(node, RouteNode):
            return any(
                v.available and self._can_enter(b.steps[0])
                for v, b in zip(self._branch_views(node), node.branches, strict=True)
            )
        if isinstance(node, ForkNode):
            return all(self._can_enter(b.steps[0]) for b in node.branches)
        return False

    def _try_move(self, tok: Token) -> bool:
        target = tok.target
        if isinstance(target, StationNode):
            slot = self.stations[target.station].free_slot()
            if slot is None:
                return False
            self._begin(tok, slot)
            return True
        if isinstance(target, RouteNode):
            # Within one pass, nothing about a route changes until some token moves: a route
            # that turned one token away turns away the rest, and is not asked again.
            key = (id(target), self._pass, self._moves)
            if key in self._blocked:
                return False
            views = self._branch_views(target)
            state = self._route_state[id(target)]
            weights = target.route.weights if target.route else None
            branch = choose(target.policy, views, state, weights)
            if branch is not None:
                tok.target = target.branches[branch].steps[0]
                if self._try_move(tok):
                    self._route_state[id(target)] = commit(
                        target.policy, state, branch, views, weights
                    )
                    tok.unit.branches[target.path] = branch
                    return True
                tok.target = target
            self._blocked.add(key)
            return False
        if isinstance(target, ForkNode):
            # Enter only when every branch can start, so a unit is never half inside a fork.
            if not all(self._can_enter(b.steps[0]) for b in target.branches):
                return False
            unit = tok.unit
            self._vacate(tok)
            self._drop(tok)
            unit.joins[id(target)] = 0
            for b in target.branches:
                child = Token(unit, b.steps[0], forks=(*tok.forks, target))
                child.done_at = tok.done_at
                unit.tokens.append(child)
                self._waiting.add(child)
                self._try_move(child)
            return True
        return False

    def _branch_views(self, route: RouteNode) -> list[BranchView]:
        key = (id(route), self._pass, self._moves)
        cached = self._views.get(key)
        if cached is not None:
            return cached
        members = self._members.get(id(route))
        if members is None:  # the flow never changes: each branch's stations, looked up once
            members = [[self.stations[n] for n in b.stations()] for b in route.branches]
            self._members[id(route)] = members
        count = self._waiting.count
        conserving = route.policy in WORK_CONSERVING
        views = []
        # Asked at every move on a route (and for every route nested in a branch), so one
        # pass over each branch's stations, no generators: a plant of 125 branches asks often.
        for branch, stations in zip(route.branches, members, strict=True):
            load = 0
            lead = 0.0
            interval = 0.0  # the branch's slowest (measured) rate
            available = True
            for st in stations:
                load += st.load()
                lead += st.ewma_cycle_s
                per_slot = st.ewma_cycle_s / st.config.capacity
                if per_slot > interval:
                    interval = per_slot
                if available and not st.available:
                    available = False
            for step in branch.steps:
                load += count(step)
            # Expected time for one more unit: the branch's lead time plus the queue ahead of
            # it at the branch's slowest rate.
            if conserving and available:
                # A load-aware policy never holds a unit for a busy branch while another
                # branch could take it now: it picks among the branches with room.
                available = self._can_enter(branch.steps[0])
            views.append(
                BranchView(available=available, load=load, expected_s=lead + load * interval)
            )
        self._views[key] = views
        return views

    def _begin(self, tok: Token, slot: Slot) -> None:
        """Commit ``tok`` to ``slot`` and start the command task that moves it there."""
        self._moves += 1
        tok.ready_at = max(tok.done_at, slot.idle_since) if tok.done_at else 0.0
        unit = tok.unit
        st = slot.station
        previous = tok.slot
        if previous is not None:
            # The unit stays physically in ``previous`` until the PLC accepts it downstream.
            previous.occupant = None
            previous.busy = True
        self._waiting.discard(tok)
        tok.target = None
        tok.slot = slot
        tok.station = st.name
        tok.phase = Phase.COMMANDED
        tok.seq = slot.take_seq()
        tok.attempt = unit.attempts.get(st.name, 0) + 1
        unit.attempts[st.name] = tok.attempt
        slot.occupant = tok
        slot.busy = True
        st.account(self.now())
        if previous is not None:
            previous.station.account(self.now())
        self.commands.send_start(tok, slot, previous)

    # --- commands coming back ---------------------------------------------------------------

    def start_confirmed(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        """The PLC echoed the START: the unit has left ``previous``, which is owed a RESET."""
        slot.busy = False
        slot.refusals = 0
        if tok.ready_at:
            # From the moment it could move (done, and this slot free): the controller's own
            # latency, not the time the unit spent blocked waiting for room.
            latency = self.clock.real_seconds(self.now() - tok.ready_at)
            self.handovers.append(latency)
            self.handover_hist.observe(latency)
        if previous is not None:
            previous.busy = False
            previous.needs_reset = True
            previous.reset_waits_for_journal = False
        self.changed()

    def start_refused(self, tok: Token, slot: Slot, previous: Slot | None) -> None:
        """The PLC refused the START (its slot was not Idle after all): the unit stays where
        it was and tries again."""
        st = slot.station
        self.journal.step_finished(tok.unit.id, st.name, tok.attempt, self.wall(), "refused")
        slot.occupant = None
        slot.busy = False
        # Not again at once: the PLC saw something we have not yet (a fault, a hand reset).
        slot.refusals += 1
        retry = self.line.retry
        backoff = min(retry.backoff_s * 2 ** (slot.refusals - 1), retry.backoff_max_s)
        slot.held_until = self.now() + backoff
        self._held[slot] = None
        tok.phase = Phase.DONE if previous is not None else Phase.WAITING
        tok.slot = previous
        tok.station = previous.station.name if previous is not None else ""
        if previous is not None:
            previous.occupant = tok
            previous.busy = False
        tok.target = self.flow.stations[st.name]
        self._waiting.add(tok)
        st.account(self.now())
        self.changed()

    def reset_done(self, slot: Slot) -> None:
        slot.busy = False
        self.changed()

    # --- operator control -------------------------------------------------------------

    def set_in_service(self, station: str, in_service: bool, detail: str = "operator") -> None:
        """Take a station out of service (it finishes what it holds, takes nothing new).

        Journalled in order before anything that follows from it, and put back on restart.
        """
        st = self.stations[station]
        st.in_service = in_service
        st.account(self.now())
        kind = "in_service" if in_service else "out_of_service"
        wall = self.wall()
        self.journal.operator_action(kind, station, wall, detail)
        self.journal.station_event(station, kind, wall, None, detail)
        self.changed()

    def pause(self, paused: bool = True, detail: str = "operator") -> None:
        """Stop (or resume) releasing units; what is in the line carries on."""
        self.paused = paused
        self.journal.operator_action("pause" if paused else "resume", "", self.wall(), detail)
        self.changed()

    async def wait_durable(self) -> None:
        """Return once everything decided so far (operator actions included) is journalled
        durably: the operator API answers only then."""
        await self.journal.sync()

    # --- invariants and statistics ----------------------------------------------------

    def tokens(self) -> list[Token]:
        return [t for u in [*self.units.values(), *self.quarantined.values()] for t in u.tokens]

    def check_invariants(self) -> None:
        """Released = finished + quarantined + in line; no station over capacity; no token
        in two slots; no unit in two stations of one sequence."""
        assert all(u.status == "in_line" for u in self.units.values())
        total = self.released + self.recovered
        assert total == self.finished + len(self.quarantined) + len(self.units), (
            f"a unit was lost or duplicated: released {self.released}, recovered "
            f"{self.recovered}, finished "
            f"{self.finished}, quarantined {len(self.quarantined)}, in line {len(self.units)}"
        )
        seen: dict[int, Slot] = {}
        for st in self.stations.values():
            assert st.load() <= st.config.capacity
            for slot in st.slots:
                tok = slot.occupant
                if tok is None:
                    continue
                assert tok.slot is slot, f"{slot.name} occupant disagrees with its token"
                assert id(tok) not in seen, f"token in {seen.get(id(tok))} and {slot.name}"
                seen[id(tok)] = slot
        for unit in self.units.values():
            branches = [t.forks for t in unit.tokens]
            # Tokens of one unit differ only by being in different fork branches.
            assert len(unit.tokens) <= 1 or all(b for b in branches), (
                f"unit {unit.serial} at two places outside a fork"
            )

    def statistics(self) -> SupervisorStatistics:
        now = self.now()
        stations = {}
        started = self.clock.started
        for name, st in self.stations.items():
            if started:
                st.account(now)
            elapsed = max(now, 1e-9)
            stations[name] = StationStatistics(
                name=name,
                plc=st.plc,
                condition=st.condition,
                state=st.last_state,
                seconds=dict(st.seconds),
                utilization=(
                    st.busy_slot_seconds / (st.config.capacity * elapsed) if started else 0.0
                ),
                busy_seconds=st.busy_slot_seconds,
                cycles=st.cycles,
                passed=st.passed,
                rejected=st.rejected,
                faults=st.faults,
                cycle_s=st.config.cycle_s,
                ewma_cycle_s=st.ewma_cycle_s,
                capacity=st.config.capacity,
                load=st.load(),
                connected=st.connected,
                in_service=st.in_service,
                cycle_seconds=st.cycle_hist.snapshot(),
            )
        return SupervisorStatistics(
            line=self.line.line,
            elapsed_s=now,
            released=self.released,
            finished=self.finished,
            rejected=self.rejected,
            quarantined=len(self.quarantined),
            wip=len(self.units),
            paused=self.paused,
            stations=stations,
            finish_times=tuple(self.finish_times),
            lead_times=tuple(self.lead_times),
            handovers=tuple(self.handovers),
            lead_seconds=self.lead_hist.snapshot(),
            handover_seconds=self.handover_hist.snapshot(),
            quarantined_total=self.quarantine_count,
        )
