"""The trace tables (SQLModel) and the versioned migrations that create and upgrade them.

Times are stored as UTC: PostgreSQL as timestamptz, SQLite as naive ISO text (which sorts and
compares correctly because every value is UTC in the same format); both read back UTC-aware.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Connection,
    DateTime,
    Engine,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    inspect,
    text,
)
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel, select, update

from linectl.errors import StoreError
from linectl.store.records import (
    EVENT_KINDS,
    EVENT_KINDS_V1,
    OPERATOR_ACTIONS,
    STEP_RESULTS,
    STEP_STATUSES,
    UNIT_STATUSES,
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime that goes in and comes out as UTC on every database."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: give a timezone-aware time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# unit ids and PLC sequence numbers are u32, past PostgreSQL's 32-bit signed INTEGER.
_U32 = BigInteger
# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
_ID = BigInteger().with_variant(Integer(), "sqlite")


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=name)


class Unit(SQLModel, table=True):
    __tablename__ = "units"
    __table_args__ = (
        _one_of("status", UNIT_STATUSES, "ck_units_status"),
        Index("ix_units_line_status", "line", "status"),
        Index("ix_units_line_released", "line", "released_at"),
    )

    line: str = Field(primary_key=True)
    unit_id: int = Field(primary_key=True, sa_type=_U32, sa_column_kwargs={"autoincrement": False})
    serial: str = Field(unique=True)
    status: str
    released_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    branch: str | None = None
    reason: str | None = None
    quarantined_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Step(SQLModel, table=True):
    __tablename__ = "steps"
    # The primary key (line, unit_id, station, attempt) doubles as the steps-by-unit index.
    __table_args__ = (
        ForeignKeyConstraint(["line", "unit_id"], ["units.line", "units.unit_id"]),
        _one_of("status", STEP_STATUSES, "ck_steps_status"),
        _one_of("result", STEP_RESULTS, "ck_steps_result"),
        Index("ix_steps_line_station_commanded", "line", "station", "commanded_at"),
    )

    line: str = Field(primary_key=True)
    unit_id: int = Field(primary_key=True, sa_type=_U32, sa_column_kwargs={"autoincrement": False})
    station: str = Field(primary_key=True)
    attempt: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    slot: int
    seq: int = Field(sa_type=_U32)
    commanded_at: datetime = Field(sa_type=UTCDateTime)
    accepted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    status: str
    result: str | None = None
    fault_code: int = Field(default=0, sa_type=_U32)
    plc_cycle_s: float | None = None


class StationEvent(SQLModel, table=True):
    __tablename__ = "station_events"
    __table_args__ = (
        _one_of("kind", EVENT_KINDS, "ck_station_events_kind"),
        Index("ix_station_events_line_station_at", "line", "station", "at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    line: str
    station: str
    at: datetime = Field(sa_type=UTCDateTime)
    kind: str
    state: int | None = None
    detail: str = ""


class Quarantine(SQLModel, table=True):
    __tablename__ = "quarantine"
    __table_args__ = (
        ForeignKeyConstraint(["line", "unit_id"], ["units.line", "units.unit_id"]),
        Index("ix_quarantine_line_unit", "line", "unit_id"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    line: str
    unit_id: int = Field(sa_type=_U32)
    at: datetime = Field(sa_type=UTCDateTime)
    reason: str
    released_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class OperatorAction(SQLModel, table=True):
    """An operator's action on the line, journalled before it takes effect."""

    __tablename__ = "operator_actions"
    __table_args__ = (
        _one_of("action", OPERATOR_ACTIONS, "ck_operator_actions_action"),
        Index("ix_operator_actions_line_id", "line", "id"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_ID)
    line: str
    at: datetime = Field(sa_type=UTCDateTime)
    action: str
    target: str = ""
    detail: str = ""


class LineLease(SQLModel, table=True):
    """Who owns each line (store/lease.py). ``epoch`` rises by one at every change of owner;
    the store refuses a transaction of any other epoch."""

    __tablename__ = "leases"

    line: str = Field(primary_key=True)
    epoch: int = Field(sa_type=BigInteger)
    host: str
    pid: int
    # PostgreSQL: the owner's lease session, which holds the line's advisory lock.
    backend_pid: int | None = None
    since: datetime = Field(sa_type=UTCDateTime)
    # PostgreSQL: the end of the lease unless renewed (database time); SQLite: unused.
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SchemaMeta(SQLModel, table=True):
    """One row: the schema version the database is at."""

    __tablename__ = "schema_meta"

    id: int = Field(default=1, primary_key=True)
    version: int


TRACE_TABLES = ("units", "steps", "station_events", "quarantine")


def _create_v1(conn: Connection) -> None:
    # Today's tables as version 1 had them (station event kinds of then), so an empty database
    # walks 1, 2, ... and ends up exactly like a migrated one.
    meta = MetaData()
    for name in TRACE_TABLES:
        SQLModel.metadata.tables[name].to_metadata(meta)
    events = meta.tables["station_events"]
    kinds = next(c for c in events.constraints if c.name == "ck_station_events_kind")
    events.constraints.remove(kinds)
    events.append_constraint(_one_of("kind", EVENT_KINDS_V1, "ck_station_events_kind"))
    meta.create_all(conn)


def _create_v2(conn: Connection) -> None:
    # Version 2: operator actions become durable (drain, pause and release survive a restart).
    SQLModel.metadata.create_all(conn, tables=[SQLModel.metadata.tables["operator_actions"]])


def _event_kinds_v3(conn: Connection) -> None:
    """Allow the station event kinds added since version 1 (``constraint_moved``)."""
    check = _one_of("kind", EVENT_KINDS, "ck_station_events_kind")
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE station_events DROP CONSTRAINT ck_station_events_kind"))
        conn.execute(
            text(f"ALTER TABLE station_events ADD CONSTRAINT {check.name} CHECK ({check.sqltext})")
        )
        return
    # SQLite cannot alter a CHECK constraint: rebuild the table (its documented recipe).
    table = SQLModel.metadata.tables["station_events"]
    columns = ", ".join(c.name for c in table.columns)
    conn.execute(text("ALTER TABLE station_events RENAME TO station_events_v1"))
    for index in table.indexes:
        conn.execute(text(f"DROP INDEX IF EXISTS {index.name}"))
    table.create(conn)
    conn.execute(
        text(f"INSERT INTO station_events ({columns}) SELECT {columns} FROM station_events_v1")
    )
    conn.execute(text("DROP TABLE station_events_v1"))


def _leases_v4(conn: Connection) -> None:
    # Version 4: one owner per line, with a fencing epoch (store/lease.py).
    SQLModel.metadata.create_all(conn, tables=[SQLModel.metadata.tables["leases"]])


Migration = Callable[[Connection], None]

# MIGRATIONS[n] takes a database from version n-1 to n; version 0 is an empty database.
MIGRATIONS: Mapping[int, Migration] = {
    1: _create_v1,
    2: _create_v2,
    3: _event_kinds_v3,
    4: _leases_v4,
}
SCHEMA_VERSION = max(MIGRATIONS)


def prepare(
    engine: Engine,
    where: str,
    *,
    create: bool = True,
    migrations: Mapping[int, Migration] = MIGRATIONS,
) -> int:
    """Bring the database to the newest version in ``migrations``; return the version found.

    Runs in one transaction, so a failed migration leaves the database as it was. A database
    newer than ``migrations`` knows, or one that has trace tables but no version, is refused
    untouched. With ``create=False`` nothing is created or migrated: it is for readers.
    """
    target = max(migrations)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two processes opening one empty database must not both create the schema.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('linectl.schema'))"))
        inspector = inspect(conn)
        if not inspector.has_table(SchemaMeta.__tablename__):
            ours = [name for name in TRACE_TABLES if inspector.has_table(name)]
            if ours:
                raise StoreError(
                    f"trace store {where}: has table(s) {', '.join(ours)} but no schema_meta; "
                    f"it was not made by linectl or is damaged, so it is left untouched"
                )
            if not create:
                raise StoreError(f"trace store {where}: no trace recorded here yet")
            SQLModel.metadata.tables[SchemaMeta.__tablename__].create(conn)
            conn.execute(SchemaMeta.__table__.insert().values(id=1, version=0))
        found = conn.execute(select(SchemaMeta.version).where(SchemaMeta.id == 1)).scalar()
        if found is None:
            raise StoreError(f"trace store {where}: schema_meta holds no version; left untouched")
        if found > target:
            raise StoreError(
                f"trace store {where}: schema version {found} is newer than this linectl "
                f"understands ({target}); upgrade linectl. The database was left untouched"
            )
        if found < target and not create:
            raise StoreError(
                f"trace store {where}: schema version {found} is older than this linectl's "
                f"({target}); open it once with the supervisor to upgrade it"
            )
        for version in range(found + 1, target + 1):
            migrations[version](conn)
            conn.execute(update(SchemaMeta).where(SchemaMeta.id == 1).values(version=version))
    return found
