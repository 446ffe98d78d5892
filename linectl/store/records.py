"""What the trace store hands out: plain frozen dataclasses, so no caller imports SQLModel."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

UNIT_STATUSES = ("in_line", "finished", "quarantined")
STEP_STATUSES = ("commanded", "running", "done", "failed")
STEP_RESULTS = ("pass", "reject", "fault", "refused", "abandoned")
# A station that completed its cycle has done its step, whatever its quality verdict.
DONE_RESULTS = frozenset({"pass", "reject"})
EVENT_KINDS = (
    "state",
    "fault",
    "reset",
    "connection_lost",
    "connection_restored",
    "violation",
    "out_of_service",
    "in_service",
    "constraint_moved",  # the measured bottleneck moved to this station (bottleneck.py)
)
# What an operator may do; each is journalled before it takes effect and replayed on restart.
OPERATOR_ACTIONS = ("pause", "resume", "out_of_service", "in_service", "release")
# Kinds the version-1 schema's CHECK constraint allows (migration 3 added the rest).
EVENT_KINDS_V1 = EVENT_KINDS[:8]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One attempt of one unit at one station."""

    unit_id: int
    station: str
    slot: int
    attempt: int
    seq: int
    commanded_at: datetime
    accepted_at: datetime | None
    finished_at: datetime | None
    status: str
    result: str | None
    fault_code: int
    plc_cycle_s: float | None

    @property
    def duration_s(self) -> float | None:
        """Seconds from the PLC starting the step (or, if it never echoed, from the command)."""
        if self.finished_at is None:
            return None
        start = self.accepted_at or self.commanded_at
        return (self.finished_at - start).total_seconds()


@dataclass(frozen=True, slots=True)
class UnitRecord:
    line: str
    unit_id: int
    serial: str
    status: str
    released_at: datetime
    finished_at: datetime | None
    branch: str | None
    reason: str | None
    quarantined_at: datetime | None
    steps: tuple[StepRecord, ...] = ()
    releases: tuple[datetime, ...] = ()  # when an operator released it from quarantine


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    at: datetime
    reason: str
    released_at: datetime | None


@dataclass(frozen=True, slots=True)
class UnitTrace:
    """A unit's whole history: the unit, its steps in order, and every quarantining."""

    unit: UnitRecord
    quarantines: tuple[QuarantineRecord, ...]

    @property
    def steps(self) -> tuple[StepRecord, ...]:
        return self.unit.steps


@dataclass(frozen=True, slots=True)
class StationEventRecord:
    station: str
    at: datetime
    kind: str
    state: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One step joined with its unit: a row of the quality team's spreadsheet."""

    line: str
    serial: str
    unit_id: int
    unit_status: str
    released_at: datetime
    unit_finished_at: datetime | None
    branch: str | None
    station: str
    slot: int
    attempt: int
    seq: int
    commanded_at: datetime
    accepted_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    step_status: str
    result: str | None
    fault_code: int
    plc_cycle_s: float | None


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Counters of the writer, read by the metrics collector at scrape time."""

    writes_queued: int
    writes_committed: int
    batches: int
    queue_depth: int
    queue_size: int
    last_batch_size: int
    last_commit_latency_s: float | None
    failed: bool


@dataclass(frozen=True, slots=True)
class OperatorActionRecord:
    at: datetime
    action: str  # one of OPERATOR_ACTIONS
    target: str  # the station, or the unit's serial for a release; "" for the line
    detail: str


@dataclass(frozen=True, slots=True)
class OperatorState:
    """What the operator's actions leave in force: the line paused, stations out of service."""

    paused: bool = False
    out_of_service: frozenset[str] = frozenset()
