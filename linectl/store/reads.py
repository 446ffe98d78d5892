"""The store's queries, run in a reader thread; each returns plain records."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime

from sqlalchemy import Connection, func, tuple_
from sqlmodel import exists, select

from linectl.store.records import (
    ExportRow,
    OperatorActionRecord,
    OperatorState,
    QuarantineRecord,
    StationEventRecord,
    StepRecord,
    UnitRecord,
    UnitTrace,
)
from linectl.store.schema import OperatorAction, Quarantine, StationEvent, Step, Unit

# Units per IN (...) list, well under SQLite's limit on bound parameters.
_CHUNK = 500

_STEP_ORDER = (Step.commanded_at, Step.attempt, Step.station)


def _step(row) -> StepRecord:
    return StepRecord(
        unit_id=row.unit_id,
        station=row.station,
        slot=row.slot,
        attempt=row.attempt,
        seq=row.seq,
        commanded_at=row.commanded_at,
        accepted_at=row.accepted_at,
        finished_at=row.finished_at,
        status=row.status,
        result=row.result,
        fault_code=row.fault_code,
        plc_cycle_s=row.plc_cycle_s,
    )


def _unit(row, steps: Sequence[StepRecord] = ()) -> UnitRecord:
    return UnitRecord(
        line=row.line,
        unit_id=row.unit_id,
        serial=row.serial,
        status=row.status,
        released_at=row.released_at,
        finished_at=row.finished_at,
        branch=row.branch,
        reason=row.reason,
        quarantined_at=row.quarantined_at,
        steps=tuple(steps),
    )


def _steps_of(conn: Connection, line: str, unit_ids: Sequence[int]) -> dict[int, list[StepRecord]]:
    found: dict[int, list[StepRecord]] = defaultdict(list)
    for start in range(0, len(unit_ids), _CHUNK):
        chunk = unit_ids[start : start + _CHUNK]
        rows = conn.execute(
            select(Step)
            .where(Step.line == line, Step.unit_id.in_(chunk))
            .order_by(Step.unit_id, *_STEP_ORDER)
        )
        for row in rows:
            found[row.unit_id].append(_step(row))
    return found


def _releases_of(conn: Connection, line: str, unit_ids: Sequence[int]) -> dict[int, list]:
    found: dict[int, list] = defaultdict(list)
    for start in range(0, len(unit_ids), _CHUNK):
        chunk = unit_ids[start : start + _CHUNK]
        rows = conn.execute(
            select(Quarantine.unit_id, Quarantine.released_at)
            .where(
                Quarantine.line == line,
                Quarantine.unit_id.in_(chunk),
                Quarantine.released_at.is_not(None),
            )
            .order_by(Quarantine.unit_id, Quarantine.released_at, Quarantine.id)
        )
        for unit_id, released_at in rows:
            found[unit_id].append(released_at)
    return found


def _with_steps(conn: Connection, line: str, rows: Iterable) -> list[UnitRecord]:
    rows = list(rows)
    ids = [r.unit_id for r in rows]
    steps = _steps_of(conn, line, ids)
    releases = _releases_of(conn, line, ids)
    return [
        replace(_unit(r, steps.get(r.unit_id, ())), releases=tuple(releases.get(r.unit_id, ())))
        for r in rows
    ]


def next_unit_id(conn: Connection, line: str) -> int:
    highest = conn.execute(select(func.max(Unit.unit_id)).where(Unit.line == line)).scalar()
    return 1 if highest is None else highest + 1


def units(
    conn: Connection,
    line: str,
    *,
    status: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    station: str | None = None,
    limit: int | None = None,
) -> list[UnitRecord]:
    """Units of the line released in [since, until), oldest first, each with its steps."""
    query = select(Unit).where(Unit.line == line)
    if status is not None:
        query = query.where(Unit.status.in_(status))
    if since is not None:
        query = query.where(Unit.released_at >= since)
    if until is not None:
        query = query.where(Unit.released_at < until)
    if station is not None:
        query = query.where(
            exists().where(
                Step.line == Unit.line, Step.unit_id == Unit.unit_id, Step.station == station
            )
        )
    query = query.order_by(Unit.released_at, Unit.unit_id)
    if limit is not None:
        query = query.limit(limit)
    return _with_steps(conn, line, conn.execute(query))


def trace(conn: Connection, serial: str) -> UnitTrace | None:
    """The unit with ``serial`` (of any line: serials are unique), or None if there is none."""
    row = conn.execute(select(Unit).where(Unit.serial == serial)).first()
    if row is None:
        return None
    quarantines = conn.execute(
        select(Quarantine)
        .where(Quarantine.line == row.line, Quarantine.unit_id == row.unit_id)
        .order_by(Quarantine.at, Quarantine.id)
    )
    return UnitTrace(
        unit=_with_steps(conn, row.line, [row])[0],
        quarantines=tuple(
            QuarantineRecord(at=q.at, reason=q.reason, released_at=q.released_at)
            for q in quarantines
        ),
    )


def station_events(
    conn: Connection,
    line: str,
    *,
    station: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[StationEventRecord]:
    query = select(StationEvent).where(StationEvent.line == line)
    if station is not None:
        query = query.where(StationEvent.station == station)
    if since is not None:
        query = query.where(StationEvent.at >= since)
    if until is not None:
        query = query.where(StationEvent.at < until)
    query = query.order_by(StationEvent.at, StationEvent.id)
    if limit is not None:
        query = query.limit(limit)
    return [
        StationEventRecord(station=e.station, at=e.at, kind=e.kind, state=e.state, detail=e.detail)
        for e in conn.execute(query)
    ]


ExportKey = tuple[int, str, int]


def export_page(
    conn: Connection, line: str, after: ExportKey | None, size: int
) -> tuple[list[ExportRow], ExportKey | None]:
    """Up to ``size`` steps joined with their units, in key order after ``after``.

    Paging on the steps' key keeps each page one index range scan, however long the history.
    """
    query = (
        export_query()
        .where(Step.line == line)
        .order_by(Step.unit_id, Step.station, Step.attempt)
        .limit(size)
    )
    if after is not None:
        query = query.where(tuple_(Step.unit_id, Step.station, Step.attempt) > tuple_(*after))
    rows = []
    last: ExportKey | None = None
    for r in conn.execute(query):
        rows.append(export_row(line, r))
        last = (r.unit_id, r.station, r.attempt)
    return rows, (last if len(rows) == size else None)


def operator_actions(
    conn: Connection, line: str, *, since: datetime | None = None, limit: int | None = None
) -> list[OperatorActionRecord]:
    """The operator's actions on the line, oldest first."""
    query = select(OperatorAction).where(OperatorAction.line == line)
    if since is not None:
        query = query.where(OperatorAction.at >= since)
    query = query.order_by(OperatorAction.id.desc())
    if limit is not None:
        query = query.limit(limit)
    rows = list(conn.execute(query))
    return [OperatorActionRecord(r.at, r.action, r.target, r.detail) for r in reversed(rows)]


def operator_state(conn: Connection, line: str) -> OperatorState:
    """What the latest action on the line and on each station left in force."""
    latest = (
        select(func.max(OperatorAction.id))
        .where(
            OperatorAction.line == line,
            OperatorAction.action.in_(("pause", "resume", "out_of_service", "in_service")),
        )
        .group_by(OperatorAction.target)
    )
    rows = conn.execute(
        select(OperatorAction.action, OperatorAction.target).where(OperatorAction.id.in_(latest))
    )
    paused, out = False, set()
    for action, target in rows:
        if action == "pause":
            paused = True
        elif action == "out_of_service":
            out.add(target)
    return OperatorState(paused=paused, out_of_service=frozenset(out))


def export_query():
    """Steps joined with their units, the columns an ExportRow is made of."""
    return (
        select(Step, Unit.serial, Unit.status.label("unit_status"), Unit.released_at)
        .add_columns(Unit.finished_at.label("unit_finished_at"), Unit.branch)
        .join(Unit, (Unit.line == Step.line) & (Unit.unit_id == Step.unit_id))
    )


def export_row(line: str, r) -> ExportRow:
    step = _step(r)
    return ExportRow(
        line=line,
        serial=r.serial,
        unit_id=r.unit_id,
        unit_status=r.unit_status,
        released_at=r.released_at,
        unit_finished_at=r.unit_finished_at,
        branch=r.branch,
        station=r.station,
        slot=r.slot,
        attempt=r.attempt,
        seq=r.seq,
        commanded_at=r.commanded_at,
        accepted_at=r.accepted_at,
        finished_at=r.finished_at,
        duration_s=step.duration_s,
        step_status=r.status,
        result=r.result,
        fault_code=r.fault_code,
        plc_cycle_s=r.plc_cycle_s,
    )
