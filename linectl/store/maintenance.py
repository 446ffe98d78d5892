"""Keeping a trace database for years: prune (with an archive), online backup, size figures.

Prune removes the steps of finished units, and station events, older than a horizon; units in
the line or in quarantine keep every step, and unit rows stay (they hold the serials and the
highest unit id, which must never be reused). It works in small batches, each its own short
transaction whose first statement is the DELETE, so the line's writer waits at most one batch
(aimed at ``target_s``, 20 ms) and gets the database between batches.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, delete, event, func, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from linectl.errors import StoreError
from linectl.store.db import make_engine, mask, parse_url
from linectl.store.export import ExportWriter
from linectl.store.reads import export_query, export_row
from linectl.store.schema import SchemaMeta, StationEvent, Step, Unit, prepare

_MIN_UNITS, _MAX_UNITS = 1, 500
_MIN_EVENTS, _MAX_EVENTS = 10, 5_000
# How often a prune copies its WAL back into a SQLite database (each copy ends in an fsync).
_CHECKPOINT_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class DbFigures:
    """How big the database is and how far back its history goes (metrics read these)."""

    size_bytes: int
    oldest_at: datetime | None  # commanded_at of the oldest step still stored
    schema_version: int
    newest_release_at: datetime | None = None  # the latest unit released (doctor's clock check)


@dataclass(frozen=True, slots=True)
class PruneResult:
    units: int  # finished units whose steps were removed
    steps: int
    events: int
    batches: int
    longest_batch_s: float  # the longest DELETE transaction, waiting for the lock included
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return (self.steps + self.events) / self.seconds if self.seconds > 0 else 0.0


def figures(conn: Connection, line: str) -> DbFigures:
    """Size of the whole database, and the oldest step of ``line`` (cheap: index lookups)."""
    if conn.dialect.name == "sqlite":
        pages = conn.execute(text("PRAGMA page_count")).scalar() or 0
        size = pages * (conn.execute(text("PRAGMA page_size")).scalar() or 0)
    else:
        size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar() or 0
    # The lowest unit id that has steps is the oldest unit with history (ids only grow).
    first = conn.execute(select(func.min(Step.unit_id)).where(Step.line == line)).scalar()
    oldest = None
    if first is not None:
        oldest = conn.execute(
            select(func.min(Step.commanded_at)).where(Step.line == line, Step.unit_id == first)
        ).scalar()
    version = conn.execute(select(SchemaMeta.version).where(SchemaMeta.id == 1)).scalar() or 0
    newest = conn.execute(select(func.max(Unit.released_at)).where(Unit.line == line)).scalar()
    return DbFigures(int(size), oldest, int(version), newest)


def _old_units(conn: Connection, line: str, horizon: datetime, after: int, limit: int) -> list[int]:
    has_steps = (
        select(Step.unit_id).where(Step.line == Unit.line, Step.unit_id == Unit.unit_id).exists()
    )
    query = (
        select(Unit.unit_id)
        .where(
            Unit.line == line,
            Unit.status == "finished",
            Unit.finished_at < horizon,
            Unit.unit_id > after,
            has_steps,
        )
        .order_by(Unit.unit_id)
        .limit(limit)
    )
    return list(conn.execute(query).scalars())


def _old_events(conn: Connection, line: str, station: str, horizon: datetime, limit: int) -> list:
    # One station at a time: a range of the (line, station, at) index, oldest first, with no
    # sort, however many events there are.
    query = (
        select(StationEvent)
        .where(
            StationEvent.line == line, StationEvent.station == station, StationEvent.at < horizon
        )
        .order_by(StationEvent.at)
        .limit(limit)
    )
    return list(conn.execute(query))


def _event_stations(conn: Connection, line: str) -> list[str]:
    query = select(StationEvent.station).where(StationEvent.line == line).distinct()
    return sorted(conn.execute(query).scalars())


class _Archive:
    """Rows about to be deleted, in a .jsonl.gz that is synced to disk before the DELETE.

    Steps are the rows ``linectl export --format jsonl`` prints; station events carry
    ``"record": "station_event"``. A prune cut short may leave rows in the archive that are
    still in the database (never the other way round): they are archived again next time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw = path.open("ab")
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="ab")
        self._text = _GzText(self._gz)
        self._steps = ExportWriter(self._text, "jsonl")

    def steps(self, rows: Sequence) -> None:
        self._steps.write(rows)

    def events(self, line: str, rows: Sequence) -> None:
        for e in rows:
            entry = {
                "record": "station_event",
                "line": line,
                "station": e.station,
                "at": e.at.isoformat(timespec="microseconds"),
                "kind": e.kind,
                "state": e.state,
                "detail": e.detail,
            }
            self._text.write(json.dumps(entry) + "\n")

    def sync(self) -> None:
        self._gz.flush()
        self._raw.flush()
        os.fsync(self._raw.fileno())

    def close(self) -> None:
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()


class _GzText:
    """The text face ExportWriter writes to."""

    def __init__(self, gz: gzip.GzipFile) -> None:
        self._gz = gz

    def write(self, text: str) -> int:
        return self._gz.write(text.encode())


def prune(
    url: str,
    line: str,
    horizon: datetime,
    *,
    archive: Path | None = None,
    target_s: float = 0.02,
    first_batch: int = 50,
    on_batch: Callable[[PruneResult], None] | None = None,
) -> PruneResult:
    """Remove ``line``'s finished units' steps and its station events older than ``horizon``.

    Each batch is sized so its DELETE transaction takes about ``target_s``; after each, the
    database is left alone at least as long as the batch held it. With ``archive`` the rows
    go to that .jsonl.gz (appended), durably, before they are deleted. ``first_batch`` is
    the first batch's units, before the size adapts.
    """
    if horizon.tzinfo is None:
        raise ValueError("horizon must be timezone-aware")
    where = mask(url)
    engine = make_engine(url, create=False)
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        # A commit that fills the WAL past its limit checkpoints it before returning, and the
        # write lock's next holder may be the line: checkpoint between batches instead.
        event.listen(engine, "connect", _no_autocheckpoint)
    try:
        prepare(engine, where, create=False)
        out = _Archive(archive) if archive is not None else None
        try:
            return _prune(
                engine, line, horizon.astimezone(UTC), out, target_s, first_batch, on_batch, sqlite
            )
        finally:
            if out is not None:
                out.close()
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        raise StoreError(f"trace store {where}: prune failed: {orig}") from exc
    finally:
        engine.dispose()


def _prune(
    engine: Engine,
    line: str,
    horizon: datetime,
    out: _Archive | None,
    target_s: float,
    size: int,
    on_batch: Callable[[PruneResult], None] | None,
    sqlite: bool,
) -> PruneResult:
    started = time.perf_counter()
    units = steps = events = batches = 0
    longest = 0.0
    after = 0
    checkpointed = [time.perf_counter()]

    def result() -> PruneResult:
        return PruneResult(units, steps, events, batches, longest, time.perf_counter() - started)

    def held(seconds: float) -> None:
        nonlocal longest, batches
        batches += 1
        longest = max(longest, seconds)
        if on_batch is not None:
            on_batch(result())
        if sqlite and time.perf_counter() - checkpointed[0] > _CHECKPOINT_EVERY_S:
            _checkpoint(engine)
            checkpointed[0] = time.perf_counter()
        # Leave the database to the line at least as long as we held it.
        time.sleep(max(seconds, 0.005))

    while True:
        with engine.connect() as conn:
            ids = _old_units(conn, line, horizon, after, size)
            rows = []
            if ids and out is not None:
                query = export_query().where(Step.line == line, Step.unit_id.in_(ids))
                rows = [export_row(line, r) for r in conn.execute(query)]
        if not ids:
            break
        if out is not None:
            out.steps(rows)
            out.sync()
        t0 = time.perf_counter()
        with engine.begin() as conn:
            gone = conn.execute(delete(Step).where(Step.line == line, Step.unit_id.in_(ids)))
        took = time.perf_counter() - t0
        units += len(ids)
        steps += gone.rowcount
        after = ids[-1]
        size = _adapt(size, took, target_s, _MIN_UNITS, _MAX_UNITS)
        held(took)
    size = 500
    with engine.connect() as conn:
        stations = _event_stations(conn, line)
    while stations:
        with engine.connect() as conn:
            found = _old_events(conn, line, stations[0], horizon, size)
        if not found:
            stations.pop(0)
            continue
        if out is not None:
            out.events(line, found)
            out.sync()
        t0 = time.perf_counter()
        with engine.begin() as conn:
            gone = conn.execute(
                delete(StationEvent).where(StationEvent.id.in_([e.id for e in found]))
            )
        took = time.perf_counter() - t0
        events += gone.rowcount
        size = _adapt(size, took, target_s, _MIN_EVENTS, _MAX_EVENTS)
        held(took)
    return result()


def _no_autocheckpoint(dbapi_conn, _record) -> None:
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")


def _checkpoint(engine: Engine) -> None:
    """Copy the WAL back into the database without blocking writers (PASSIVE)."""
    raw = engine.raw_connection()
    try:
        raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        raw.close()


def _adapt(size: int, took: float, target: float, low: int, high: int) -> int:
    """Next batch size: halve after a batch over target, grow by half while well under it."""
    if took > target:
        return max(low, size // 2)
    if took < target / 2:
        return min(high, size + size // 2 + 1)
    return size


def rename_steps(
    conn: Connection, line: str, renames: Mapping[str, str], unit_ids: Sequence[int]
) -> int:
    """Record the steps of ``unit_ids`` at each old station as at its new one."""
    changed = 0
    for old, new in renames.items():
        result = conn.execute(
            update(Step)
            .where(Step.line == line, Step.station == old, Step.unit_id.in_(list(unit_ids)))
            .values(station=new)
        )
        changed += result.rowcount
    return changed


# --- Backup ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size_bytes: int
    seconds: float


def pg_dump_hint(url: str, dest: Path) -> str:
    """How to back up a PostgreSQL trace store: pg_dump, which copies a live database."""
    parsed = parse_url(url).set(drivername="postgresql")
    shown = parsed.render_as_string(hide_password=True)
    return (
        f"trace store {mask(url)} is PostgreSQL: back it up with pg_dump, which takes a "
        f"consistent snapshot while the line runs:\n  pg_dump --format=custom --file "
        f"{dest} '{shown}'\n(password from ~/.pgpass or PGPASSWORD; restore with pg_restore)"
    )


def backup(url: str, dest: Path) -> BackupResult:
    """A consistent copy of a live SQLite trace store with SQLite's online backup API.

    Copied in one step from one read snapshot: in WAL mode a reader never blocks the line's
    writer, and a single step cannot be restarted by the writes that go on meanwhile. The
    copy is written beside ``dest``, checked, synced and then renamed into place.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise StoreError(pg_dump_hint(url, dest))
    source = Path(parsed.database or "")
    if not source.exists():
        raise StoreError(f"trace store {mask(url)}: no such database file '{source}'")
    if dest.exists():
        raise StoreError(f"{dest}: exists already; give a new file name")
    partial = dest.with_name(dest.name + ".partial")
    started = time.perf_counter()
    done = False
    src = sqlite3.connect(source, timeout=10)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst, pages=-1)
            ok = dst.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"{dest}: the copy fails SQLite's quick_check: {ok}")
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            dst.close()
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        partial.rename(dest)
        done = True
    except sqlite3.Error as exc:
        raise StoreError(f"backup of {mask(url)} to {dest} failed: {exc}") from exc
    finally:
        src.close()
        if not done:
            partial.unlink(missing_ok=True)
    return BackupResult(dest, dest.stat().st_size, time.perf_counter() - started)
