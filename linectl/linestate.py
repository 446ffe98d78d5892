"""What the supervisor knows of the line: units, their tokens, stations and their slots.

Plain data with the bookkeeping that goes with it (time per condition, EWMA cycle times), and
the frozen statistics that metrics and ``linectl compare`` read. No I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from linectl.config import Station
from linectl.contract import SlotStatus, State, is_newer
from linectl.flow import ForkNode, Node
from linectl.histogram import Histogram, HistogramSnapshot


class Condition(StrEnum):
    """Why a station is (not) working, in the words of the shop floor."""

    WORKING = "working"  # a slot executes a unit
    BLOCKED = "blocked"  # done with a unit that cannot move on
    STARVED = "starved"  # nothing to do
    FAULTED = "faulted"  # a slot is Aborted, or the PLC broke the contract
    DISCONNECTED = "disconnected"  # its PLC is unreachable
    OUT_OF_SERVICE = "out_of_service"  # taken out by the operator and empty


class Phase(StrEnum):
    WAITING = "waiting"  # wants to enter ``target`` (may still hold the slot it finished in)
    COMMANDED = "commanded"  # START written or being written to ``slot``
    RUNNING = "running"  # the PLC accepted and works on it
    DONE = "done"  # finished at ``slot``; moving on when there is room


@dataclass(eq=False)
class Unit:
    id: int
    serial: str
    released_at: float
    status: str = "in_line"  # in_line | finished | quarantined
    tokens: list[Token] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # station -> tries so far
    joins: dict[int, int] = field(default_factory=dict)  # id(fork) -> branches done
    branches: dict[str, int] = field(default_factory=dict)  # route path -> branch taken
    resume: Node | None = None  # where it goes back in when released (None: the first step)
    # Attempts per station when it was last released: retries count from there.
    attempts_at_release: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    finished_at: float | None = None


@dataclass(eq=False)
class Token:
    """One unit's presence in one branch of the flow."""

    unit: Unit
    target: Node | None  # where it wants to go next (None while it works at a station)
    phase: Phase = Phase.WAITING
    slot: Slot | None = None  # the slot it occupies (working, done, or blocked in)
    seq: int = 0  # sequence number of its START on ``slot``
    station: str = ""  # station of ``slot``
    attempt: int = 0
    done_at: float = 0.0  # when the PLC reported it done at its last station
    ready_at: float = 0.0  # when it could move on: done, and its next slot free (handover start)
    forks: tuple[ForkNode, ...] = ()  # the forks it is inside, innermost last
    discard: bool = False  # its unit was quarantined: finish the cycle, then drop it


@dataclass(eq=False)
class Slot:
    station: StationState
    index: int
    status: SlotStatus | None = None  # last status the PLC showed; None before the first read
    occupant: Token | None = None
    next_seq: int = 1
    busy: bool = False  # a command to this slot is in flight
    # Whether that RESET must wait for the journal: not when the unit moved on, since the next
    # station's durable intent already proves this step passed (recovery.py reads it so).
    reset_waits_for_journal: bool = True
    reset_at: float = 0.0  # not before this time (fault reset backoff)
    # After the PLC refused a START here, no new START before this time (refusal backoff).
    held_until: float = 0.0
    refusals: int = 0  # consecutive refused STARTs
    executing_since: float | None = None
    idle_since: float = 0.0  # when the PLC last showed it Idle

    @property
    def name(self) -> str:
        return f"{self.station.name}[{self.index}]"

    @property
    def needs_reset(self) -> bool:
        """A RESET is owed (unit moved on, dropped, or fault cleared)."""
        return self in self.station.owed

    @needs_reset.setter
    def needs_reset(self, owed: bool) -> None:
        # Kept in a set shared by the whole line, so the dispatch pass visits only the slots
        # that owe a RESET instead of every slot of every station.
        if owed:
            self.station.owed[self] = None
        else:
            self.station.owed.pop(self, None)

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq = seq + 1 if seq < 0xFFFF_FFFF else 1
        return seq

    def seen(self, status: SlotStatus) -> None:
        aborted = status.state == State.ABORTED
        if aborted != (self.status is not None and self.status.state == State.ABORTED):
            self.station.aborted += 1 if aborted else -1
        self.status = status
        if self.index == 0:  # a station's state is its first slot's, however it was learnt
            self.station.last_state = status.state
        if status.ack_seq and not is_newer(self.next_seq, status.ack_seq):
            self.next_seq = status.ack_seq + 1 if status.ack_seq < 0xFFFF_FFFF else 1


@dataclass(eq=False)
class StationState:
    name: str
    config: Station
    plc: str
    slots: list[Slot] = field(default_factory=list)
    # Slots owing a RESET, in the order they came to owe it (a dict as an ordered set); the
    # dispatcher gives every station the same one.
    owed: dict[Slot, None] = field(default_factory=dict, repr=False)
    # Stations whose picture changed since the last dispatch pass (an ordered set shared by
    # the line, like ``owed``): the pass publishes one event for each.
    changed: dict[StationState, None] = field(default_factory=dict, repr=False)
    connected: bool = False
    in_service: bool = True
    violation: str = ""
    aborted: int = 0  # slots the PLC shows Aborted (kept by ``Slot.seen``)
    consecutive_faults: int = 0
    ewma_cycle_s: float = 0.0
    condition: Condition = Condition.DISCONNECTED
    since: float = 0.0
    seconds: dict[Condition, float] = field(default_factory=lambda: dict.fromkeys(Condition, 0.0))
    busy_slot_seconds: float = 0.0
    cycle_hist: Histogram = field(default_factory=Histogram)
    cycles: int = 0
    passed: int = 0
    rejected: int = 0
    faults: int = 0
    last_state: State = State.UNDEFINED  # slot 0's, kept by ``Slot.seen``

    def __post_init__(self) -> None:
        self.slots = [Slot(self, i) for i in range(self.config.capacity)]
        self.ewma_cycle_s = self.config.cycle_s

    @property
    def faulted(self) -> bool:
        return self.aborted > 0 or bool(self.violation)

    @property
    def available(self) -> bool:
        """May take new work (room aside)."""
        return self.connected and self.in_service and not self.faulted

    def free_slot(self) -> Slot | None:
        if not self.available:
            return None
        for slot in self.slots:
            if (
                slot.occupant is None
                and not slot.busy
                and not slot.needs_reset
                and not slot.held_until
                and slot.status is not None
                and slot.status.state == State.IDLE
            ):
                return slot
        return None

    def load(self) -> int:
        return sum(1 for s in self.slots if s.occupant is not None)

    def observe_cycle(self, seconds: float, alpha: float = 0.2) -> None:
        self.ewma_cycle_s += alpha * (seconds - self.ewma_cycle_s)

    def classify(self) -> Condition:
        if not self.connected:
            return Condition.DISCONNECTED
        if self.faulted:
            return Condition.FAULTED
        holding = False
        for s in self.slots:
            if s.occupant is not None:
                if s.occupant.phase is Phase.RUNNING or s.occupant.phase is Phase.COMMANDED:
                    return Condition.WORKING
                holding = True
        if holding:
            return Condition.BLOCKED
        return Condition.STARVED if self.in_service else Condition.OUT_OF_SERVICE

    def account(self, now: float) -> None:
        """Charge the time since the last change to the current condition, then re-classify."""
        since = self.since
        # Several changes often come at one instant (always, in virtual time): nothing to
        # charge then, and adding 0.0 would change no sum.
        if now != since:
            self.seconds[self.condition] += now - since
            for slot in self.slots:
                if slot.executing_since is not None:
                    self.busy_slot_seconds += now - max(slot.executing_since, since)
            self.since = now
        self.condition = self.classify()
        self.changed[self] = None
        for slot in self.slots:
            if slot.occupant is not None and slot.occupant.phase is Phase.RUNNING:
                if slot.executing_since is None:
                    slot.executing_since = now
            else:
                slot.executing_since = None


@dataclass(frozen=True, slots=True)
class StationStatistics:
    name: str
    plc: str
    condition: Condition
    state: State  # PackML state of slot 0 (the station's state when capacity is 1)
    seconds: dict[Condition, float]
    utilization: float  # busy slot-time / (capacity x time observed)
    busy_seconds: float  # slot-seconds spent executing a unit
    cycles: int
    passed: int
    rejected: int
    faults: int
    cycle_s: float  # nominal
    ewma_cycle_s: float  # measured
    capacity: int
    load: int
    connected: bool
    in_service: bool
    cycle_seconds: HistogramSnapshot  # the PLC's measured cycle times, in wall seconds


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    line: str
    elapsed_s: float
    released: int
    finished: int
    rejected: int
    quarantined: int
    wip: int
    paused: bool
    stations: dict[str, StationStatistics]
    finish_times: tuple[float, ...]  # seconds since start at which each unit finished
    lead_times: tuple[float, ...]  # of finished units, in finish order
    handovers: tuple[float, ...]  # recent station-done -> next-START-confirmed latencies
    lead_seconds: HistogramSnapshot
    handover_seconds: HistogramSnapshot
    quarantined_total: int  # every quarantining, including units later released back


class Recent(deque[float]):
    """The last ``maxlen`` observations, for percentiles without unbounded memory."""

    def __init__(self, maxlen: int = 10_000) -> None:
        super().__init__(maxlen=maxlen)
