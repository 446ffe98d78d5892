"""Sustained write rate of the trace store on SQLite (synchronous=FULL) and PostgreSQL.

Each simulated station loops over units: release the unit, record the step intent (awaited
until committed, as the supervisor does before commanding the PLC), the PLC's acceptance and
the result, then finish the unit. A step is thus three step writes: the intent row inserted,
then updated twice. "Step writes/s" counts those rows written or updated in the steps table
per second, from the first write until the last is committed.

    .venv/bin/python bench/store.py [--seconds 3] [--stations 1,4,16] [--pg URL | --no-pg]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from linectl.store import TraceStore

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Result:
    database: str
    stations: int
    seconds: float
    steps: int
    writes: int
    batches: int

    @property
    def step_writes_per_s(self) -> float:
        return 3 * self.steps / self.seconds


async def station(store: TraceStore, name: str, units: itertools.count, stop: float) -> int:
    steps = 0
    while time.monotonic() < stop:
        unit = next(units)
        now = datetime.now(UTC)
        await store.unit_released(unit, f"{store.line}-{unit:06d}", now)
        await store.step_commanded(unit, name, 0, 1, unit & 0xFFFFFFFF, now)
        await store.step_accepted(unit, name, 1, datetime.now(UTC))
        await store.step_finished(unit, name, 1, datetime.now(UTC), "pass", plc_cycle_s=0.5)
        await store.unit_finished(unit, datetime.now(UTC))
        steps += 1
    return steps


async def run(database: str, url: str, stations: int, seconds: float) -> Result:
    # A fresh line per run, so every run starts from unit 1 on an equally empty line.
    store = await TraceStore.open(url, f"bench_{secrets.token_hex(3)}")
    try:
        units = itertools.count(1)
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(station(store, f"st{i}", units, started + seconds))
                for i in range(stations)
            ]
        await store.flush()
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    stats = store.statistics()
    return Result(
        database,
        stations,
        elapsed,
        sum(t.result() for t in tasks),
        stats.writes_committed,
        stats.batches,
    )


def _pg_database(admin: str) -> tuple[str, str]:
    name = f"linectl_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))


def _drop_pg_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def report(result: Result) -> None:
    print(
        f"{result.database:<10} {result.stations:>8} {result.seconds:>7.2f} "
        f"{result.steps:>8} {result.step_writes_per_s:>14,.0f} "
        f"{result.writes / result.seconds:>12,.0f} {result.writes / result.batches:>10.1f}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="Length of each run.")
    parser.add_argument("--stations", default="1,4,16", help="Concurrent stations per run.")
    parser.add_argument("--pg", default=PG_ADMIN, help="PostgreSQL server (admin URL).")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only.")
    args = parser.parse_args()
    counts = [int(n) for n in args.stations.split(",")]

    print(
        f"{'database':<10} {'stations':>8} {'seconds':>7} {'steps':>8} {'step writes/s':>14} "
        f"{'all writes/s':>12} {'per commit':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
        for n in counts:
            report(await run("sqlite", url, n, args.seconds))
    if args.no_pg:
        return
    name, url = _pg_database(args.pg)
    try:
        for n in counts:
            report(await run("postgresql", url, n, args.seconds))
    finally:
        _drop_pg_database(args.pg, name)


if __name__ == "__main__":
    asyncio.run(main())
