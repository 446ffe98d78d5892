"""The writer's side of the store: apply one batch of queued writes in one transaction.

Runs in the store's writer thread, on one connection it keeps. Consecutive writes of one kind
go to the database as one executemany, so a batch of a few thousand writes costs a few
statements and one commit. The writes on a handover's path (units, steps, station events) are
plain SQL handed to the database driver's own ``executemany``, prepared once per connection by
the driver's statement cache: SQLAlchemy's per-execution work (compiled-cache lookup, result
set-up, type processing of each row) was a large share of the controller's CPU. Anything else
may still use SQLAlchemy Core on the same connection and transaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam
from sqlalchemy.exc import SQLAlchemyError

from linectl.errors import StoreError
from linectl.store.schema import OperatorAction, Quarantine, Step, Unit

Params = dict[str, Any]
Write = tuple[str, Params]  # (kind, parameters); kind "flush" is a marker that writes nothing

_units = Unit.__table__
_steps = Step.__table__
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


class Plain:
    """One SQL statement with ``:name`` parameters, run through the DBAPI cursor's executemany.

    ``times`` names the parameters that are datetimes: they are converted as the column type
    (``UTCDateTime``) converts them, so SQLAlchemy's reads find exactly what its writes store.
    """

    _NAME = re.compile(r":(\w+)")

    def __init__(self, sql: str, times: tuple[str, ...] = ()) -> None:
        self.sql = " ".join(sql.split())
        self.names = tuple(self._NAME.findall(self.sql))
        self.times = times
        self._forms: dict[str, tuple[str, Callable[[Params], tuple]]] = {}

    def _form(self, dialect) -> tuple[str, Callable[[Params], tuple]]:
        """The SQL in the driver's positional style and a row → parameters function, made
        once per dialect."""
        form = self._forms.get(dialect.name)
        if form is None:
            marker = "?" if dialect.paramstyle == "qmark" else "%s"
            sql = self._NAME.sub(marker, self.sql)
            to_db = _units.c.released_at.type.dialect_impl(dialect).bind_processor(dialect)
            getters = [
                (lambda row, n=n: to_db(row[n])) if n in self.times and to_db else None
                for n in self.names
            ]
            if any(getters):
                pairs = list(zip(self.names, getters, strict=True))

                def args(row: Params) -> tuple:
                    return tuple(get(row) if get else row[n] for n, get in pairs)
            else:
                names = self.names

                def args(row: Params) -> tuple:
                    return tuple(row[n] for n in names)

            form = self._forms[dialect.name] = (sql, args)
        return form

    def exists(self, conn: Connection, row: Params) -> bool:
        """Whether the query finds a row (a SELECT, for error messages)."""
        sql, args = self._form(conn.dialect)
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.execute(sql, args(row))
            return cursor.fetchone() is not None
        finally:
            cursor.close()

    def run(self, conn: Connection, rows: list[Params]) -> int:
        """Execute for every row in the connection's transaction; return the rows changed."""
        sql, args = self._form(conn.dialect)
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.executemany(sql, [args(row) for row in rows])
            return cursor.rowcount
        finally:
            cursor.close()


_STEP_KEY = "line = :k_line AND unit_id = :k_unit AND station = :k_station AND attempt = :k_attempt"
_UNIT_KEY = "line = :k_line AND unit_id = :k_unit"
_STEP = Plain(f"SELECT 1 FROM steps WHERE {_STEP_KEY}")
_UNIT = Plain(f"SELECT 1 FROM units WHERE {_UNIT_KEY}")
_QUARANTINED_UNIT = Plain(f"SELECT 1 FROM units WHERE {_UNIT_KEY} AND status = 'quarantined'")
_INSERT_UNIT = Plain(
    "INSERT INTO units (line, unit_id, serial, status, released_at) "
    "VALUES (:line, :unit_id, :serial, :status, :released_at)",
    ("released_at",),
)
_INSERT_STEP = Plain(
    "INSERT INTO steps (line, unit_id, station, attempt, slot, seq, commanded_at, status, "
    "fault_code) VALUES (:line, :unit_id, :station, :attempt, :slot, :seq, :commanded_at, "
    ":status, :fault_code)",
    ("commanded_at",),
)
_INSERT_EVENT = Plain(
    "INSERT INTO station_events (line, station, at, kind, state, detail) "
    "VALUES (:line, :station, :at, :kind, :state, :detail)",
    ("at",),
)
_PLAIN_APPEND_BRANCH = Plain(
    "UPDATE units SET branch = CASE WHEN branch IS NULL OR branch = '' THEN :b_branch "
    f"ELSE branch || ';' || :b_branch END WHERE {_UNIT_KEY}"
)
# An echo that arrives after the result must not reopen the step.
_PLAIN_ACCEPT = Plain(
    "UPDATE steps SET accepted_at = :accepted_at, "
    "status = CASE WHEN status = 'commanded' THEN 'running' ELSE status END "
    f"WHERE {_STEP_KEY}",
    ("accepted_at",),
)
_PLAIN_FINISH = Plain(
    "UPDATE steps SET finished_at = :finished_at, status = :status, result = :result, "
    f"fault_code = :fault_code, plc_cycle_s = :plc_cycle_s WHERE {_STEP_KEY}",
    ("finished_at",),
)
_PLAIN_UNIT_FINISH = Plain(
    f"UPDATE units SET status = 'finished', finished_at = :finished_at WHERE {_UNIT_KEY}",
    ("finished_at",),
)


def _updated(conn: Connection, stmt, rows: list[Params], kind: str, missing: str) -> None:
    """Run an update for every row and insist each one matched exactly one record."""
    if isinstance(stmt, Plain):
        changed = stmt.run(conn, rows)
    else:
        changed = conn.execute(stmt, rows).rowcount
    if changed == len(rows):
        return
    if stmt is _UNIT_RELEASE:
        found = _QUARANTINED_UNIT
    else:
        found = _STEP if "k_station" in rows[0] else _UNIT
    for row in rows:
        if not found.exists(conn, row):
            raise StoreError(f"{kind} for {_name(row)}: {missing}")
    raise StoreError(f"{kind}: {changed} records changed for {len(rows)} writes")


def _name(row: Params) -> str:
    name = f"line '{row['k_line']}' unit {row['k_unit']}"
    if "k_station" in row:
        name += f" station '{row['k_station']}' attempt {row['k_attempt']}"
    return name


def _unit_released(conn: Connection, rows: list[Params]) -> None:
    _INSERT_UNIT.run(conn, rows)


def _step_commanded(conn: Connection, rows: list[Params]) -> None:
    _INSERT_STEP.run(conn, rows)
    branched = [
        {"k_line": r["line"], "k_unit": r["unit_id"], "b_branch": r["b_branch"]}
        for r in rows
        if r["b_branch"]
    ]
    if branched:
        _updated(conn, _PLAIN_APPEND_BRANCH, branched, "step_commanded", "unit was never released")


def _step_accepted(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _PLAIN_ACCEPT, rows, "step_accepted", "the step was never commanded")


def _step_finished(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _PLAIN_FINISH, rows, "step_finished", "the step was never commanded")


def _unit_finished(conn: Connection, rows: list[Params]) -> None:
    _updated(conn, _PLAIN_UNIT_FINISH, rows, "unit_finished", "the unit was never released")


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
    _INSERT_EVENT.run(conn, rows)


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


# The kinds whose statements are all plain: a batch of only these needs no SQLAlchemy at all.
_PLAIN_KINDS = frozenset(
    {
        "unit_released",
        "step_commanded",
        "step_accepted",
        "step_finished",
        "unit_finished",
        "station_event",
        "flush",
    }
)


def _write(conn: Connection, writes: Sequence[Write]) -> None:
    """The body of every write transaction."""
    for kind, rows in plan(writes):
        _APPLY[kind](conn, rows)


class Writer:
    """The writer thread's side of the store, on one connection kept between batches (a pool
    checkout and its events per batch cost as much as the writes); replaced after a failure,
    so the next batch starts on a fresh (for PostgreSQL, pre-pinged) connection."""

    def __init__(
        self, engine: Engine, where: str, fence: Callable[[Connection], None] | None = None
    ) -> None:
        self._engine = engine
        self._where = where
        # Run first in every write transaction: refuses it once another owner has the line.
        self._fence = fence or (lambda conn: None)
        self._conn: Connection | None = None
        # Plain statements raise the driver's own errors, not SQLAlchemy's.
        self._errors = (SQLAlchemyError, StoreError, engine.dialect.loaded_dbapi.Error)

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _apply(self, writes: Sequence[Write]) -> None:
        if self._conn is None:
            self._conn = self._engine.connect()
        conn = self._conn
        try:
            if all(kind in _PLAIN_KINDS for kind, _ in writes):
                # The handover's writes: the transaction too is the driver's own, without
                # SQLAlchemy's begin and commit machinery (a third of a batch's CPU).
                raw = conn.connection.driver_connection
                if conn.dialect.name == "sqlite":
                    raw.execute("BEGIN")  # autocommit mode (see db.py): begin explicitly
                try:
                    self._fence(conn)
                    _write(conn, writes)
                except Exception:
                    raw.rollback()
                    raise
                raw.commit()
            else:
                with conn.begin():
                    self._fence(conn)
                    _write(conn, writes)
        except Exception:
            self.close()
            raise

    def apply(self, writes: Sequence[Write]) -> tuple[int, StoreError | None]:
        """Commit ``writes`` in order; return how many were committed and the error, if any.

        All of them go in one transaction. If it fails, they are replayed one per transaction
        up to the first that fails, so every write before the culprit is kept and the error
        names the culprit rather than the batch.
        """
        try:
            self._apply(writes)
            return len(writes), None
        except self._errors as exc:
            if len(writes) == 1:
                return 0, _translate(exc, writes[0], self._where)
        for done, write in enumerate(writes):
            try:
                self._apply([write])
            except self._errors as exc:
                return done, _translate(exc, write, self._where)
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
