"""The writer's side of the store: apply one batch of queued writes in one transaction.

Runs in the writer's worker thread. Consecutive writes of one kind go to the database as one
executemany, so a batch of a few thousand writes costs a few statements and one commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, case, exists, or_, select
from sqlalchemy.exc import SQLAlchemyError

from linectl.errors import StoreError
from linectl.store.schema import OperatorAction, Quarantine, StationEvent, Step, Unit

Params = dict[str, Any]
Write = tuple[str, Params]  # (kind, parameters); kind "flush" is a marker that writes nothing

_units = Unit.__table__
_steps = Step.__table__
_events = StationEvent.__table__
_quarantine = Quarantine.__table__
_actions = OperatorAction.__table__

# Bound names in a WHERE clause must differ from the column names being set, and a parameter
# named like a column of the table is set on it, so keys and extras carry prefixes.
_unit_key = and_(_units.c.line == bindparam("k_line"), _units.c.unit_id == bindparam("k_unit"))
_step_key = and_(
    _steps.c.line == bindparam("k_line"),
    _steps.c.unit_id == bindparam("k_unit"),
    _steps.c.station == bindparam("k_station"),
    _steps.c.attempt == bindparam("k_attempt"),
)

_ACCEPT = (
    _steps.update()
    .where(_step_key)
    .values(
        accepted_at=bindparam("accepted_at"),
        # An echo that arrives after the result must not reopen the step.
        status=case((_steps.c.status == "commanded", "running"), else_=_steps.c.status),
    )
)
_FINISH = (
    _steps.update()
    .where(_step_key)
    .values(
        finished_at=bindparam("finished_at"),
        status=bindparam("status"),
        result=bindparam("result"),
        fault_code=bindparam("fault_code"),
        plc_cycle_s=bindparam("plc_cycle_s"),
    )
)
_branch = bindparam("b_branch", type_=_units.c.branch.type)
_APPEND_BRANCH = (
    _units.update()
    .where(_unit_key)
    .values(
        branch=case(
            (or_(_units.c.branch.is_(None), _units.c.branch == ""), _branch),
            else_=_units.c.branch + ";" + _branch,
        )
    )
)
_UNIT_FINISH = (
    _units.update().where(_unit_key).values(status="finished", finished_at=bindparam("finished_at"))
)
_UNIT_QUARANTINE = (
    _units.update()
    .where(_unit_key)
    .values(
        status="quarantined",
        reason=bindparam("reason"),
        quarantined_at=bindparam("quarantined_at"),
    )
)
_UNIT_RELEASE = (
    _units.update().where(_unit_key, _units.c.status == "quarantined").values(status="in_line")
)
_QUARANTINE_RELEASE = (
    _quarantine.update()
    .where(
        _quarantine.c.line == bindparam("k_line"),
        _quarantine.c.unit_id == bindparam("k_unit"),
        _quarantine.c.released_at.is_(None),
    )
    .values(released_at=bindparam("q_released_at"))
)


def _updated(conn: Connection, stmt, rows: list[Params], kind: str, missing: str) -> None:
    """Run an update for every row and insist each one matched exactly one record."""
    result = conn.execute(stmt, rows)
    if result.rowcount == len(rows):
        return
    key = _step_key if "k_station" in rows[0] else _unit_key
    table = _steps if key is _step_key else _units
    extra = _units.c.status == "quarantined" if stmt is _UNIT_RELEASE else True
    for row in rows:
        if not conn.execute(select(exists().where(key, extra).select_from(table)), row).scalar():
            raise StoreError(f"{kind} for {_name(row)}: {missing}")
    raise StoreError(f"{kind}: {result.rowcount} records changed for {len(rows)} writes")


def _name(row: Params) -> str:
    name = f"line '{row['k_line']}' unit {row['k_unit']}"
    if "k_station" in row:
        name += f" station '{row['k_station']}' attempt {row['k_attempt']}"
    return name


def _unit_released(conn: Connection, rows: list[Params]) -> None:
    conn.execute(_units.insert(), rows)


def _step_commanded(conn: Connection, rows: list[Params]) -> None:
    conn.execute(_steps.insert(), [{k: v for k, v in r.items() if k != "b_branch"} for r in rows])
    branched = [
        {"k_line": r["line"], "k_unit": r["unit_id"], "b_branch": r["b_branch"]}
        for r in rows
        if r["b_branch"]
    ]
    if branched:
        _updated(conn, _APPEND_BRANCH, branched, "step_commanded", "unit was never released")


def _step_accepted(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _ACCEPT, rows, "step_accepted", "the step was never commanded")


def _step_finished(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _FINISH, rows, "step_finished", "the step was never commanded")


def _unit_finished(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _UNIT_FINISH, rows, "unit_finished", "the unit was never released")


def _unit_quarantined(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _UNIT_QUARANTINE, rows, "unit_quarantined", "the unit was never released")
    conn.execute(
        _quarantine.insert(),
        [
            {
                "line": r["k_line"],
                "unit_id": r["k_unit"],
                "at": r["quarantined_at"],
                "reason": r["reason"],
            }
            for r in rows
        ],
    )


def _quarantine_released(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _UNIT_RELEASE, rows, "quarantine_released", "the unit is not quarantined")
    conn.execute(_QUARANTINE_RELEASE, rows)


def _station_event(conn: Connection, rows: list[Params]) -> None:
    conn.execute(_events.insert(), rows)


def _operator_action(conn: Connection, rows: list[Params]) -> None:
    conn.execute(_actions.insert(), rows)


def _flush(conn: Connection, rows: list[Params]) -> None:
    pass


_APPLY: dict[str, Callable[[Connection, list[Params]], None]] = {
    "unit_released": _unit_released,
    "step_commanded": _step_commanded,
    "step_accepted": _step_accepted,
    "step_finished": _step_finished,
    "unit_finished": _unit_finished,
    "unit_quarantined": _unit_quarantined,
    "quarantine_released": _quarantine_released,
    "station_event": _station_event,
    "operator_action": _operator_action,
    "flush": _flush,
}


def plan(writes: Sequence[Write]) -> list[tuple[str, list[Params]]]:
    """Gather a batch into few runs of one kind, keeping the order of the writes to each unit.

    Writes to different units commute, so the n-th write to each unit can go in one layer,
    layer after layer; within a layer, writes of a kind form one executemany. Sixteen
    stations' interleaved writes then cost a few statements instead of one each. Writes that
    touch no unit (station events) keep their order among themselves in the first layer.
    """
    layers: list[dict[str, list[Params]]] = []
    depth: dict[int, int] = {}
    for kind, params in writes:
        unit = params.get("unit_id", params.get("k_unit"))
        layer = 0 if unit is None else depth.get(unit, -1) + 1
        if unit is not None:
            depth[unit] = layer
        if layer == len(layers):
            layers.append({})
        layers[layer].setdefault(kind, []).append(params)
    return [(kind, rows) for layer in layers for kind, rows in layer.items()]


def _apply(engine: Engine, writes: Sequence[Write]) -> None:
    with engine.begin() as conn:
        for kind, rows in plan(writes):
            _APPLY[kind](conn, rows)


def apply_batch(
    engine: Engine, where: str, writes: Sequence[Write]
) -> tuple[int, StoreError | None]:
    """Commit ``writes`` in order; return how many were committed and the error, if any.

    All of them go in one transaction. If it fails, they are replayed one per transaction
    up to the first that fails, so every write before the culprit is kept and the error
    names the culprit rather than the batch.
    """
    try:
        _apply(engine, writes)
        return len(writes), None
    except (SQLAlchemyError, StoreError) as exc:
        if len(writes) == 1:
            return 0, _translate(exc, writes[0], where)
    for done, write in enumerate(writes):
        try:
            _apply(engine, [write])
        except (SQLAlchemyError, StoreError) as exc:
            return done, _translate(exc, write, where)
    # The batch failed but every write alone succeeded: a transient fault, now gone.
    return len(writes), None


def _translate(exc: Exception, write: Write, where: str) -> StoreError:
    kind, params = write
    if isinstance(exc, StoreError):
        error = StoreError(f"trace store {where}: {exc}")
    else:
        orig = getattr(exc, "orig", None) or exc
        lines = str(orig).strip().splitlines()
        detail = lines[0] if lines else type(orig).__name__
        error = StoreError(
            f"trace store {where}: recording {kind} for {_describe(params)} failed: {detail}"
        )
    error.__cause__ = exc
    return error


def _describe(params: Params) -> str:
    line = params.get("line", params.get("k_line"))
    unit = params.get("unit_id", params.get("k_unit"))
    parts = [f"line '{line}'"]
    if unit is not None:
        parts.append(f"unit {unit}")
    station = params.get("station", params.get("k_station"))
    if station is not None:
        parts.append(f"station '{station}'")
    attempt = params.get("attempt", params.get("k_attempt"))
    if attempt is not None:
        parts.append(f"attempt {attempt}")
    return " ".join(parts)
