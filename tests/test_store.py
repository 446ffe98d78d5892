"""The trace store on SQLite and PostgreSQL: what is written reads back, intents are durable
before step_commanded returns, a crash loses no intent, and failures are loud."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from linectl.cli import app
from linectl.errors import StoreError
from linectl.store import (
    QuarantineRecord,
    StationEventRecord,
    StepRecord,
    TraceStore,
    UnitRecord,
)
from linectl.store.db import make_engine
from linectl.store.export import COLUMNS, ExportWriter
from linectl.store.schema import MIGRATIONS, SCHEMA_VERSION, prepare
from linectl.store.writes import plan
from tests.helpers import eventually
from tests.pg import pg_schema_url, pg_url  # noqa: F401 - fixtures

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh schema on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trace.sqlite3'}"
    return request.getfixturevalue("pg_schema_url")


def query(url: str, sql: str, **params: object) -> list[tuple]:
    """Run ``sql`` on a fresh engine of its own, as another process would see the database."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


# --- Round trips -----------------------------------------------------------------------------


async def test_every_write_reads_back_exactly_as_written(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", at(0))
        await store.step_commanded(1, "kitting", 0, 1, 41, at(1), branch="flow[1]=0")
        await store.step_accepted(1, "kitting", 1, at(1.25))
        await store.step_finished(1, "kitting", 1, at(9.5), "pass", plc_cycle_s=8.2)
        await store.step_commanded(1, "press_2", 1, 1, 42, at(10), branch="flow[2]=1")
        await store.step_accepted(1, "press_2", 1, at(10.5))
        await store.step_finished(1, "press_2", 1, at(12), "fault", fault_code=17, plc_cycle_s=1.5)
        await store.station_event("press_2", "fault", at(12), state=9, detail="fault 17")
        await store.unit_quarantined(1, "press_2 fault 17", at(13))
        await store.station_event("press_2", "reset", at(19))
        await store.quarantine_released(1, at(20))
        await store.step_commanded(1, "press_2", 1, 2, 2**32 - 1, at(21))
        await store.step_accepted(1, "press_2", 2, at(21.5))
        await store.step_finished(1, "press_2", 2, at(40), "reject", plc_cycle_s=18.4)
        await store.unit_finished(1, at(41))
        trace = await store.trace("L1-000001")
        events = await store.station_events()

    assert trace.unit == UnitRecord(
        line="L1",
        unit_id=1,
        serial="L1-000001",
        status="finished",
        released_at=at(0),
        finished_at=at(41),
        branch="flow[1]=0;flow[2]=1",
        reason="press_2 fault 17",
        quarantined_at=at(13),
        steps=(
            StepRecord(1, "kitting", 0, 1, 41, at(1), at(1.25), at(9.5), "done", "pass", 0, 8.2),
            StepRecord(
                1, "press_2", 1, 1, 42, at(10), at(10.5), at(12), "failed", "fault", 17, 1.5
            ),
            StepRecord(
                1, "press_2", 1, 2, 2**32 - 1, at(21), at(21.5), at(40), "done", "reject", 0, 18.4
            ),
        ),
        releases=(at(20),),
    )
    assert trace.quarantines == (QuarantineRecord(at(13), "press_2 fault 17", at(20)),)
    assert trace.steps[0].duration_s == pytest.approx(8.25)
    assert events == [
        StationEventRecord("press_2", at(12), "fault", 9, "fault 17"),
        StationEventRecord("press_2", at(19), "reset", None, ""),
    ]


async def test_times_come_back_as_utc_whatever_zone_they_were_given_in(url: str) -> None:
    cest = timezone(timedelta(hours=2))
    given = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=cest)
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", given)
        (unit,) = await store.units()
    assert unit.released_at == given
    assert unit.released_at.tzinfo == UTC
    assert unit.released_at == datetime(2024, 5, 1, 8, 0, 0, 123456, tzinfo=UTC)


async def test_a_unit_can_be_quarantined_released_and_quarantined_again(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", at(0))
        await store.unit_quarantined(1, "torque low", at(1))
        await store.quarantine_released(1, at(2))
        await store.unit_quarantined(1, "leak", at(3))
        trace = await store.trace("L1-000001")
    assert trace.unit.status == "quarantined"
    assert (trace.unit.reason, trace.unit.quarantined_at) == ("leak", at(3))
    assert trace.quarantines == (
        QuarantineRecord(at(1), "torque low", at(2)),
        QuarantineRecord(at(3), "leak", None),
    )


# --- Write-ahead, ordering and failures -----------------------------------------------------


async def test_step_commanded_returns_only_once_another_connection_sees_the_row(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", at(0))
        for n in range(1, 4):
            await store.step_commanded(1, f"s{n}", 0, 1, n, at(n))
            rows = query(url, "SELECT status, seq FROM steps WHERE station = :s", s=f"s{n}")
            assert rows == [("commanded", n)]


async def test_intents_queued_with_step_intended_are_durable_after_flush(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", at(0))
        for n in range(1, 4):
            await store.step_intended(1, f"s{n}", 0, 1, n, at(n), branch=f"flow[{n}]=0")
        await store.flush()
        assert query(url, "SELECT count(*) FROM steps WHERE status = 'commanded'") == [(3,)]
        assert query(url, "SELECT branch FROM units") == [("flow[1]=0;flow[2]=0;flow[3]=0",)]


async def test_writes_are_applied_in_call_order(url: str) -> None:
    """Finished after commanded, in one batch; a late echo does not reopen a finished step."""
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", at(0))
        await store.step_commanded(1, "a", 0, 1, 1, at(1))
        await store.step_finished(1, "a", 1, at(3), "pass")
        await store.step_accepted(1, "a", 1, at(2))
        (unit,) = await store.units()
    (step,) = unit.steps
    assert (step.status, step.result, step.accepted_at, step.finished_at) == (
        "done",
        "pass",
        at(2),
        at(3),
    )


async def test_a_write_the_database_rejects_stops_the_store_loudly(url: str) -> None:
    store = await TraceStore.open(url, "L1")
    await store.unit_released(1, "L1-000001", at(0))
    await store.step_commanded(1, "a", 0, 1, 1, at(1))
    await store.step_finished(1, "b", 1, at(2), "pass")  # b was never commanded
    with pytest.raises(StoreError, match=r"station 'b' attempt 1: the step was never commanded"):
        await store.step_commanded(1, "c", 0, 1, 2, at(3))
    with pytest.raises(StoreError, match="never commanded"):
        await store.unit_finished(1, at(4))
    assert store.statistics().failed
    with pytest.raises(StoreError, match="never commanded"):
        await store.close()
    # Everything before the culprit was kept, nothing after it was.
    assert query(url, "SELECT station FROM steps") == [("a",)]


async def test_a_duplicate_intent_is_refused_naming_the_step(url: str) -> None:
    store = await TraceStore.open(url, "L1")
    await store.unit_released(7, "L1-000007", at(0))
    await store.step_commanded(7, "a", 0, 1, 1, at(1))
    with pytest.raises(StoreError, match=r"step_commanded for line 'L1' unit 7 station 'a'"):
        await store.step_commanded(7, "a", 0, 1, 2, at(2))
    with pytest.raises(StoreError):
        await store.close()


async def test_bad_arguments_are_refused_at_the_call_and_the_store_carries_on(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        with pytest.raises(ValueError, match="naive"):
            await store.unit_released(1, "L1-000001", datetime(2024, 5, 1))
        with pytest.raises(ValueError, match="unit_id"):
            await store.unit_released(0, "L1-000000", at(0))
        with pytest.raises(ValueError, match="unit_id"):
            await store.unit_released(2**32, "L1-4294967296", at(0))
        with pytest.raises(ValueError, match="result"):
            await store.step_finished(1, "a", 1, at(1), "ok")
        with pytest.raises(ValueError, match="kind"):
            await store.station_event("a", "exploded", at(1))
        await store.unit_released(1, "L1-000001", at(0))
        assert await store.next_unit_id() == 2


async def test_writes_after_close_are_refused(url: str) -> None:
    store = await TraceStore.open(url, "L1")
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.unit_released(1, "L1-000001", at(0))
    with pytest.raises(StoreError, match="closed"):
        await store.units()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["unit_released", "step_commanded", "step_finished", "station_event"]),
            st.integers(1, 4),
        ),
        max_size=40,
    )
)
def test_batching_keeps_the_order_of_writes_to_each_unit_and_of_events(
    calls: list[tuple[str, int]],
) -> None:
    writes = []
    for n, (kind, unit) in enumerate(calls):
        key = "k_unit" if kind == "step_finished" else "unit_id"
        writes.append((kind, {"n": n} if kind == "station_event" else {key: unit, "n": n}))
    applied = [(kind, row) for kind, rows in plan(writes) for row in rows]
    assert sorted(row["n"] for _, row in applied) == list(range(len(writes)))
    for unit in range(1, 5):
        touching = [r["n"] for _, r in applied if unit in (r.get("unit_id"), r.get("k_unit"))]
        assert touching == sorted(touching)
    events = [r["n"] for kind, r in applied if kind == "station_event"]
    assert events == sorted(events)


# --- Queue: backpressure, drain, statistics --------------------------------------------------


async def test_a_tiny_queue_still_completes_every_write(url: str) -> None:
    async def station(store: TraceStore, name: str, units: range) -> None:
        for n, unit in enumerate(units, 1):
            await store.step_commanded(unit, name, 0, 1, n, at(n))
            await store.step_accepted(unit, name, 1, at(n + 0.1))
            await store.step_finished(unit, name, 1, at(n + 0.5), "pass")
            await store.station_event(name, "state", at(n + 0.5), state=11)

    async with await TraceStore.open(url, "L1", queue_size=1) as store:
        for unit in range(1, 41):
            await store.unit_released(unit, f"L1-{unit:06d}", at(0))
        async with asyncio.TaskGroup() as tg:
            for i in range(4):
                tg.create_task(station(store, f"s{i}", range(1 + 10 * i, 11 + 10 * i)))
        await store.flush()
        stats = store.statistics()
    assert stats.writes_queued == stats.writes_committed == 40 + 40 * 4
    assert stats.queue_depth == 0
    # A queue of one cannot feed the writer more than a couple of writes per transaction.
    assert stats.batches >= stats.writes_committed // 2
    assert query(url, "SELECT count(*) FROM steps WHERE status = 'done'") == [(40,)]


async def test_close_commits_everything_queued(url: str) -> None:
    store = await TraceStore.open(url, "L1")
    for unit in range(1, 301):
        await store.unit_released(unit, f"L1-{unit:06d}", at(unit))
        await store.station_event("a", "state", at(unit), state=6)
    await store.close()
    stats = store.statistics()
    assert stats.writes_committed == stats.writes_queued == 600
    assert stats.last_commit_latency_s is not None
    assert query(url, "SELECT count(*) FROM units") == [(300,)]
    assert query(url, "SELECT count(*) FROM station_events") == [(300,)]


async def test_a_cancelled_close_cancels_the_writer_and_fails_waiting_intents(
    tmp_path: Path,
) -> None:
    path = tmp_path / "trace.sqlite3"
    store = await TraceStore.open(f"sqlite:///{path}", "L1")
    await store.unit_released(1, "L1-000001", at(0))
    await store.flush()
    # Another process holds the write lock, so the writer's next commit hangs in busy_timeout.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        intent = asyncio.create_task(store.step_commanded(1, "a", 0, 1, 1, at(1)))
        await eventually(
            lambda: store.statistics().writes_queued == 2 and store.statistics().queue_depth == 0,
            what="the writer to take the intent",
        )
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await store.close()
        with pytest.raises(StoreError, match="writer cancelled; writes not confirmed"):
            await intent
        assert store.statistics().failed
    finally:
        blocker.rollback()
        blocker.close()


# --- Queries ---------------------------------------------------------------------------------


async def _three_units(store: TraceStore) -> None:
    """Unit 1 finished through a; unit 2 in the line at b; unit 3 quarantined at a."""
    for unit in (1, 2, 3):
        await store.unit_released(unit, f"{store.line}-{unit:06d}", at(100 * unit))
    await store.step_commanded(1, "a", 0, 1, 1, at(101))
    await store.step_finished(1, "a", 0 + 1, at(102), "pass")
    await store.unit_finished(1, at(103))
    # Recorded out of time order: the store orders steps by time, not by arrival.
    await store.step_commanded(2, "b", 0, 1, 3, at(205))
    await store.step_commanded(2, "a", 1, 1, 2, at(201))
    await store.step_finished(2, "a", 1, at(203), "pass")
    await store.step_commanded(3, "a", 0, 1, 4, at(301))
    await store.step_finished(3, "a", 1, at(302), "reject")
    await store.unit_quarantined(3, "rejected at a", at(303))


async def test_next_unit_id_follows_the_highest_of_this_line(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        assert await store.next_unit_id() == 1
        await store.unit_released(5, "L1-000005", at(0))
        await store.unit_released(2, "L1-000002", at(1))
        assert await store.next_unit_id() == 6
    async with await TraceStore.open(url, "L2") as other:
        assert await other.next_unit_id() == 1


async def test_open_units_are_those_in_the_line_or_quarantined_with_steps_in_time_order(
    url: str,
) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await _three_units(store)
        open_units = await store.open_units()
    assert [(u.unit_id, u.status) for u in open_units] == [(2, "in_line"), (3, "quarantined")]
    assert [(s.station, s.status) for s in open_units[0].steps] == [
        ("a", "done"),
        ("b", "commanded"),
    ]


async def test_units_filter_by_status_release_time_and_station(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await _three_units(store)
        async with await TraceStore.open(url, "L2") as other:
            await other.unit_released(1, "L2-000001", at(0))

        async def ids(**filters: object) -> list[int]:
            return [u.unit_id for u in await store.units(**filters)]

        assert await ids() == [1, 2, 3]
        assert await ids(status="finished") == [1]
        assert await ids(status=["in_line", "quarantined"]) == [2, 3]
        assert await ids(since=at(200)) == [2, 3]
        assert await ids(until=at(200)) == [1]
        assert await ids(station="b") == [2]
        assert await ids(station="a", limit=2) == [1, 2]
        with pytest.raises(ValueError, match="status"):
            await store.units(status="gone")


async def test_trace_of_an_unknown_serial_names_it(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        with pytest.raises(StoreError, match="no unit with serial 'L1-999999'"):
            await store.trace("L1-999999")


async def test_export_pages_every_step_joined_with_its_unit(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await _three_units(store)
        pages = [page async for page in store.export(page_size=2)]
    rows = [row for page in pages for row in page]
    assert [len(p) for p in pages] == [2, 2]
    assert [(r.serial, r.station, r.attempt) for r in rows] == [
        ("L1-000001", "a", 1),
        ("L1-000002", "a", 1),
        ("L1-000002", "b", 1),
        ("L1-000003", "a", 1),
    ]
    assert rows[3].unit_status == "quarantined" and rows[3].result == "reject"

    out = io.StringIO()
    ExportWriter(out, "csv").write(rows)
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(table[0]) == COLUMNS
    assert table[0]["serial"] == "L1-000001"
    assert table[0]["commanded_at"] == "2024-05-01T08:01:41.000000+00:00"
    assert table[2]["finished_at"] == ""  # b is still running

    out = io.StringIO()
    ExportWriter(out, "jsonl").write(rows)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 4
    assert lines[2]["finished_at"] is None
    assert lines[0]["duration_s"] == pytest.approx(1.0)


# --- Schema versions -------------------------------------------------------------------------


async def test_a_newer_schema_is_refused_and_left_untouched(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", at(0))
    query(url, "UPDATE schema_meta SET version = :v", v=SCHEMA_VERSION + 1)
    newer = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=rf"schema version {newer} is newer .* upgrade linectl"):
        await TraceStore.open(url, "L1")
    assert query(url, "SELECT version FROM schema_meta") == [(SCHEMA_VERSION + 1,)]
    assert query(url, "SELECT serial FROM units") == [("L1-000001",)]


def test_an_older_schema_is_migrated_in_order_keeping_its_data(url: str) -> None:
    asyncio.run(_one_unit(url))
    applied = []

    def v2(conn) -> None:
        applied.append(2)
        conn.execute(text("ALTER TABLE units ADD COLUMN colour VARCHAR DEFAULT 'red'"))

    def v3(conn) -> None:
        applied.append(3)
        conn.execute(text("UPDATE units SET colour = 'blue'"))

    engine = make_engine(url)
    try:
        now = SCHEMA_VERSION
        found = prepare(engine, "test", migrations={**MIGRATIONS, now + 1: v2, now + 2: v3})
    finally:
        engine.dispose()
    assert (found, applied) == (SCHEMA_VERSION, [2, 3])
    assert query(url, "SELECT version FROM schema_meta") == [(SCHEMA_VERSION + 2,)]
    assert query(url, "SELECT serial, colour FROM units") == [("L1-000001", "blue")]


def test_a_failed_migration_leaves_the_database_as_it_was(url: str) -> None:
    asyncio.run(_one_unit(url))

    def broken(conn) -> None:
        conn.execute(text("ALTER TABLE units ADD COLUMN colour VARCHAR"))
        conn.execute(text("SELECT no_such_column FROM units"))

    engine = make_engine(url)
    try:
        with pytest.raises(Exception, match="no_such_column"):
            prepare(engine, "test", migrations={**MIGRATIONS, SCHEMA_VERSION + 1: broken})
    finally:
        engine.dispose()
    assert query(url, "SELECT version FROM schema_meta") == [(SCHEMA_VERSION,)]
    assert query(url, "SELECT * FROM units")[0][:3] == ("L1", 1, "L1-000001")
    assert asyncio.run(_serials(url)) == ["L1-000001"]


def test_a_version_1_store_learns_the_constraint_moved_event_keeping_its_events(url: str) -> None:
    engine = make_engine(url)
    try:
        prepare(engine, "test", migrations={1: MIGRATIONS[1]})
    finally:
        engine.dispose()
    insert = (
        "INSERT INTO station_events (line, station, at, kind, detail) "
        "VALUES ('L1', 'a', '2026-01-01 00:00:00', :kind, '')"
    )
    query(url, insert, kind="fault")
    with pytest.raises(Exception, match=r"ck_station_events_kind|CHECK constraint"):
        query(url, insert, kind="constraint_moved")

    async def record() -> None:
        async with await TraceStore.open(url, "L1") as store:
            await store.station_event("b", "constraint_moved", at(1), None, "from a to b")

    asyncio.run(record())
    assert query(url, "SELECT version FROM schema_meta") == [(SCHEMA_VERSION,)]
    rows = query(url, "SELECT station, kind FROM station_events ORDER BY id")
    assert rows == [("a", "fault"), ("b", "constraint_moved")]


async def _one_unit(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await store.unit_released(1, "L1-000001", at(0))


async def _serials(url: str) -> list[str]:
    async with await TraceStore.open(url, "L1") as store:
        return [u.serial for u in await store.units()]


async def test_tables_without_a_schema_version_are_not_ours_and_left_alone(url: str) -> None:
    query(url, "CREATE TABLE units (id INTEGER)")
    with pytest.raises(StoreError, match="no schema_meta; it was not made by linectl"):
        await TraceStore.open(url, "L1")
    assert query(url, "SELECT count(*) FROM units") == [(0,)]


async def test_a_reader_does_not_create_a_database(url: str, tmp_path: Path) -> None:
    query(url, "SELECT 1")  # an empty database: the SQLite file exists
    with pytest.raises(StoreError, match="no trace recorded here yet"):
        await TraceStore.open(url, "L1", create=False)
    missing = tmp_path / "nothing.sqlite3"
    with pytest.raises(StoreError, match="no such database file"):
        await TraceStore.open(f"sqlite:///{missing}", "L1", create=False)
    assert not missing.exists()


# --- Bad URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("postgresql://linectl:s3cret@127.0.0.1:1/trace", "cannot open"),
        ("mysql://linectl:s3cret@db.example/trace", "unsupported database 'mysql'"),
        ("::not a url", "not a database URL"),
        ("postgresql://linectl:s3cret@db.example:port/trace", "not a database URL"),
        ("postgresql://127.0.0.1:1/trace?password=s3cret&sslmode=disable", "cannot open"),
        ("sqlite:///{tmp}/no/such/dir/trace.sqlite3", "cannot open"),
        ("sqlite://", "in-memory"),
    ],
)
async def test_a_bad_or_unreachable_database_is_a_store_error_without_the_password(
    bad: str, message: str, tmp_path: Path
) -> None:
    bad = bad.format(tmp=tmp_path)
    with pytest.raises(StoreError, match=message) as caught:
        await TraceStore.open(bad, "L1")
    assert "s3cret" not in str(caught.value)
    if "s3cret" in bad and "://" in bad:
        assert "***" in str(caught.value)


# --- Crash ------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, itertools, sys
    from datetime import UTC, datetime
    from linectl.store import TraceStore

    async def station(store, name, units):
        for seq, unit in enumerate(units, 1):
            await store.unit_released(unit, f"crash-{unit:06d}", datetime.now(UTC))
            await store.step_commanded(unit, name, 0, 1, seq, datetime.now(UTC))
            print(f"committed {name} {unit}", flush=True)

    async def main(url):
        store = await TraceStore.open(url, "crash")
        units = itertools.count(1)
        async with asyncio.TaskGroup() as tg:
            for name in ("a", "b", "c"):
                tg.create_task(station(store, name, units))

    asyncio.run(main(sys.argv[1]))
    """
)


def test_every_intent_that_returned_survives_a_kill_9(url: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        returned = []
        while len(returned) < 60:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the writer died before the kill:\n{child.stderr.read()}")
            returned.append(line.split()[1:])
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        # Lines printed between the last read and the kill count too.
        returned += [line.split()[1:] for line in child.stdout.read().splitlines()]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    recorded = {
        (station, str(unit))
        for station, unit in query(url, "SELECT station, unit_id FROM steps WHERE line = 'crash'")
    }
    missing = [tuple(r) for r in returned if tuple(r) not in recorded]
    assert not missing, f"intents acknowledged but lost: {missing}"
    assert len(recorded) >= len(returned)


# --- CLI --------------------------------------------------------------------------------------


CONFIG = """\
line: L1
plcs:
  cell: {protocol: modbus, host: 127.0.0.1, port: 15020}
stations:
  a: {plc: cell, address: 0, cycle_s: 1}
  b: {plc: cell, address: 100, cycle_s: 1}
flow: [a, b]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "line.yaml"
    path.write_text(CONFIG)
    return path


async def _populate(url: str) -> None:
    async with await TraceStore.open(url, "L1") as store:
        await _three_units(store)


def test_cli_units_lists_units_with_filters(url: str, config: Path) -> None:
    asyncio.run(_populate(url))
    runner = CliRunner()
    result = runner.invoke(app, ["units", str(config), "--db", url])
    assert result.exit_code == 0, result.output
    assert all(f"L1-00000{n}" in result.output for n in (1, 2, 3))
    result = runner.invoke(app, ["units", str(config), "--db", url, "--status", "quarantined"])
    assert result.exit_code == 0, result.output
    assert "L1-000003" in result.output and "L1-000001" not in result.output
    result = runner.invoke(
        app,
        ["units", str(config), "--db", url, "--since", "2024-05-01T08:04:00Z", "--station", "a"],
    )
    assert result.exit_code == 0, result.output
    assert "L1-000003" in result.output and "L1-000002" not in result.output


def test_cli_trace_shows_the_whole_history(url: str, config: Path) -> None:
    asyncio.run(_populate(url))
    result = CliRunner().invoke(app, ["trace", str(config), "L1-000003", "--db", url])
    assert result.exit_code == 0, result.output
    for expected in ("L1-000003", "quarantined", "rejected at a", "reject", "08:05:01"):
        assert expected in result.output


def test_cli_export_writes_csv_and_jsonl(url: str, config: Path, tmp_path: Path) -> None:
    asyncio.run(_populate(url))
    runner = CliRunner()
    out = tmp_path / "steps.csv"
    result = runner.invoke(app, ["export", str(config), "--db", url, "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and rows[0]["serial"] == "L1-000001"
    result = runner.invoke(app, ["export", str(config), "--db", url, "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["station"] for line in result.stdout.splitlines()] == [
        "a",
        "a",
        "b",
        "a",
    ]


def test_cli_errors_go_to_stderr_with_exit_2(url: str, config: Path, tmp_path: Path) -> None:
    asyncio.run(_populate(url))
    runner = CliRunner()
    result = runner.invoke(app, ["trace", str(config), "L1-424242", "--db", url])
    assert result.exit_code == 2
    assert "no unit with serial 'L1-424242'" in result.stderr
    missing = f"sqlite:///{tmp_path / 'none.sqlite3'}"
    result = runner.invoke(app, ["units", str(config), "--db", missing])
    assert result.exit_code == 2
    assert "no such database file" in result.stderr
    result = runner.invoke(
        app, ["units", str(config), "--db", "postgresql://u:s3cret@127.0.0.1:1/x"]
    )
    assert result.exit_code == 2
    assert "s3cret" not in result.stderr and "***" in result.stderr
