"""Retention and backup of the trace store: prune (with archive), online backup, size figures."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linectl.cli import app
from linectl.errors import StoreError
from linectl.store import TraceStore
from linectl.store.maintenance import backup, prune
from tests.pg import pg_schema_url, pg_url  # noqa: F401 - fixtures

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=100)
LINE = "ret"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trace.sqlite3'}"
    return request.getfixturevalue("pg_schema_url")


async def unit(store: TraceStore, uid: int, at: datetime, *, end: str) -> None:
    """A unit through stations a and b; ``end``: finished, in_line (open at b), quarantined."""
    await store.unit_released(uid, f"{LINE}-{uid:04d}", at)
    for n, station in enumerate(("a", "b")):
        when = at + timedelta(seconds=10 * n)
        await store.step_intended(uid, station, 0, 1, uid, when)
        if end == "in_line" and station == "b":
            break
        result = "reject" if end == "quarantined" and station == "b" else "pass"
        await store.step_finished(uid, station, 1, when + timedelta(seconds=5), result)
        await store.station_event(station, "reset", when + timedelta(seconds=6), None, "slot 0")
    if end == "finished":
        await store.unit_finished(uid, at + timedelta(seconds=20))
    elif end == "quarantined":
        await store.unit_quarantined(uid, "rejected at b", at + timedelta(seconds=20))


async def fill(url: str) -> None:
    async with await TraceStore.open(url, LINE) as store:
        for uid in range(1, 6):
            await unit(store, uid, OLD + timedelta(minutes=uid), end="finished")
        await unit(store, 6, OLD, end="in_line")
        await unit(store, 7, OLD, end="quarantined")
        await unit(store, 8, NOW - timedelta(days=1), end="finished")


async def steps_by_unit(url: str) -> dict[int, int]:
    async with await TraceStore.open(url, LINE, create=False) as store:
        return {u.unit_id: len(u.steps) for u in await store.units()}


async def test_prune_removes_only_finished_units_old_steps_and_archives_them(url, tmp_path):
    await fill(url)
    archive = tmp_path / "old.jsonl.gz"
    done = await asyncio.to_thread(
        prune, url, LINE, NOW - timedelta(days=90), archive=archive, target_s=1e-6, first_batch=1
    )
    assert (done.units, done.steps) == (5, 10)
    assert done.events == 2 * 5 + 1 + 2  # resets of units 1-5, 6 (at a) and 7 (a and b)
    # A tiny target shrinks batches to one unit each: the DELETEs are many and short.
    assert done.batches >= 5 + 1
    kept = await steps_by_unit(url)
    assert kept == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 2, 7: 2, 8: 2}  # unit rows all stay
    async with await TraceStore.open(url, LINE, create=False) as store:
        assert await store.next_unit_id() == 9  # ids are never reused after a prune
        assert len(await store.station_events()) == 2  # unit 8's, from yesterday
    with gzip.open(archive, "rt") as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "record" not in r]
    events = [r for r in rows if r.get("record") == "station_event"]
    assert sorted((r["serial"], r["station"]) for r in steps) == [
        (f"{LINE}-{u:04d}", s) for u in range(1, 6) for s in ("a", "b")
    ]
    assert all(r["result"] == "pass" and r["unit_status"] == "finished" for r in steps)
    assert len(events) == done.events


async def test_a_second_prune_finds_nothing_and_appends_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'trace.sqlite3'}"
    await fill(url)
    first = await asyncio.to_thread(prune, url, LINE, NOW - timedelta(days=90))
    again = await asyncio.to_thread(prune, url, LINE, NOW - timedelta(days=90))
    assert first.steps == 10
    assert (again.units, again.steps, again.events, again.batches) == (0, 0, 0, 0)


async def test_figures_give_size_and_oldest_step(url):
    await fill(url)
    async with await TraceStore.open(url, LINE) as store:
        before = await store.figures()
        assert before.size_bytes > 0
        assert before.oldest_at == OLD + timedelta(minutes=1)
        assert before.schema_version >= 1
    await asyncio.to_thread(prune, url, LINE, NOW - timedelta(days=90))
    async with await TraceStore.open(url, LINE) as store:
        assert (await store.figures()).oldest_at == OLD  # units 6 and 7 are never pruned


async def test_backup_of_a_live_store_is_consistent_and_opens(tmp_path):
    url = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    copy = tmp_path / "copy.sqlite3"
    async with await TraceStore.open(url, LINE) as store:
        for uid in range(1, 30):
            await unit(store, uid, OLD, end="finished")
        await store.flush()
        done = await asyncio.to_thread(backup, url, copy)
        # The line goes on writing after the copy; the copy holds what was committed.
        await unit(store, 99, NOW, end="finished")
    assert done.size_bytes == copy.stat().st_size > 0
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM units").fetchone() == (29,)
        assert conn.execute("SELECT count(*) FROM steps").fetchone() == (58,)
    assert not (tmp_path / "copy.sqlite3.partial").exists()
    with pytest.raises(StoreError, match="exists already"):
        backup(url, copy)


def test_backup_of_postgresql_says_how_with_pg_dump(tmp_path):
    with pytest.raises(StoreError, match=r"pg_dump --format=custom --file .*b\.dump"):
        backup("postgresql://linectl:secret@127.0.0.1/trace", tmp_path / "b.dump")
    with pytest.raises(StoreError) as caught:
        backup("postgresql://linectl:secret@127.0.0.1/trace", tmp_path / "b.dump")
    assert "secret" not in str(caught.value)


CONFIG = """
line: ret
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 1502}
stations:
  a: {plc: p, address: 0, cycle_s: 1}
  b: {plc: p, address: 40, cycle_s: 1}
flow: [a, b]
storage: {url: "sqlite:///DB"}
"""


def test_prune_and_backup_commands(tmp_path):
    db = tmp_path / "trace.sqlite3"
    asyncio.run(fill(f"sqlite:///{db}"))
    config = tmp_path / "line.yaml"
    config.write_text(CONFIG.replace("DB", str(db)))
    runner = CliRunner()
    bad = runner.invoke(app, ["prune", str(config), "--older-than", "ninety days"])
    assert bad.exit_code == 2
    assert "is not a duration" in bad.output
    archive = tmp_path / "a.jsonl.gz"
    done = runner.invoke(
        app, ["prune", str(config), "--older-than", "90d", "--archive", str(archive)]
    )
    assert done.exit_code == 0, done.output
    assert "10 step(s) of 5 finished unit(s)" in done.output
    assert archive.exists()
    copy = tmp_path / "copy.sqlite3"
    done = runner.invoke(app, ["backup", str(config), str(copy)])
    assert done.exit_code == 0, done.output
    assert copy.exists()
    again = runner.invoke(app, ["backup", str(config), str(copy)])
    assert again.exit_code == 1
    assert "exists already" in again.output


async def test_a_scrape_shows_database_size_and_oldest_step_age(tmp_path):
    from linectl.config import parse_config
    from linectl.dispatcher import Dispatcher
    from linectl.metrics import serve_metrics
    from tests.test_metrics import scrape

    url = f"sqlite:///{tmp_path / 'trace.sqlite3'}"
    await fill(url)
    line = parse_config(CONFIG.replace("DB", str(tmp_path / "trace.sqlite3")))
    sup = Dispatcher(line)
    sup.driver_statistics = list  # a dispatcher without drivers
    async with await TraceStore.open(url, LINE) as store:
        server = await serve_metrics(sup, line, port=0, store=store)
        try:
            text = await scrape(server.port)
        finally:
            await server.stop()
    size = re.search(r'^linectl_db_size_bytes\{line="ret"\} (\S+)$', text, re.M)
    age = re.search(r'^linectl_db_oldest_step_age_seconds\{line="ret"\} (\S+)$', text, re.M)
    assert size and float(size.group(1)) > 0
    assert age and abs(float(age.group(1)) - (NOW - OLD).total_seconds() - 60) < 600
