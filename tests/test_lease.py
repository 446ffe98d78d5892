"""A line has one owner: the store's lease and its fencing epoch, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import psycopg
import pytest

from linectl.errors import LeaseHeld, LeaseLost, StoreError
from linectl.store import TraceStore
from tests.helpers import eventually
from tests.pg import pg_schema_url, pg_url  # noqa: F401  (fixtures)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lease.sqlite3'}"
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def line() -> str:
    # Advisory locks are per database, not per schema: a name of its own for each test.
    return f"lease_{secrets.token_hex(3)}"


async def opened(url: str, line: str) -> TraceStore:
    return await TraceStore.open(url, line)


def raw(url: str, sql: str) -> list[tuple]:
    """Run ``sql`` on the database behind ``url`` outside linectl (a second host, say)."""
    if url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql).fetchall()
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


@pytest.fixture
async def owner(db_url, line) -> AsyncIterator[tuple[TraceStore, object]]:
    store = await opened(db_url, line)
    lease = await store.acquire_lease(ttl_s=2.0)
    try:
        yield store, lease
    finally:
        await lease.release()
        try:
            await store.close()
        except StoreError:
            pass  # a test that fenced this store off expects its close to fail


async def test_a_second_owner_is_refused_with_one_line_naming_the_holder(db_url, line, owner):
    second = await opened(db_url, line)
    try:
        with pytest.raises(LeaseHeld) as refused:
            await second.acquire_lease(ttl_s=2.0)
    finally:
        await second.close()
    message = str(refused.value)
    assert "\n" not in message
    assert f"line '{line}' is held by host {socket.gethostname()} pid {os.getpid()} since " in (
        message
    )
    assert "(epoch 1); run with --standby" in message


async def test_the_store_refuses_a_write_of_an_older_epoch(db_url, line, owner):
    """Another host took the line over (the epoch moved on) while this process still believes
    it owns it: its next transaction reads the epoch first and refuses, writing nothing."""
    store, lease = owner
    await store.unit_released(1, f"{line}-1", NOW)
    await store.flush()
    raw(db_url, f"UPDATE leases SET epoch = epoch + 1, pid = 1 WHERE line = '{line}'")
    lease.check()  # its own clock has not run out yet
    await store.unit_released(2, f"{line}-2", NOW)
    with pytest.raises(StoreError, match=r"refused its write: the line is held by .* pid 1 "):
        await store.flush()
    assert raw(db_url, f"SELECT unit_id FROM units WHERE line = '{line}'") == [(1,)]
    with pytest.raises(LeaseLost, match="no longer owns the line"):
        lease.check()  # and it commands nothing from now on


async def test_a_released_line_is_taken_at_once_with_the_next_epoch(db_url, line):
    first = await opened(db_url, line)
    lease = await first.acquire_lease(ttl_s=2.0)
    second = await opened(db_url, line)
    try:
        told: list[str] = []
        waiting = asyncio.create_task(
            second.acquire_lease(standby=True, ttl_s=2.0, announce=told.append)
        )
        await eventually(lambda: told, what="the standby saying whom it waits for")
        assert f"line '{line}' is held by host {socket.gethostname()}" in told[0]
        assert not waiting.done()
        await lease.release()
        async with asyncio.timeout(2.0):  # well within the 2 s lease: no waiting it out
            taken = await waiting
        assert taken.epoch == lease.epoch + 1
        await second.unit_released(1, f"{line}-1", NOW)
        await second.flush()
        await taken.release()
    finally:
        await first.close()
        await second.close()


async def test_a_standby_takes_over_an_expired_lease_and_ends_the_frozen_owners_session(
    pg_schema_url,  # noqa: F811
    line,
):
    """The owner stops renewing (frozen) while its session still holds the advisory lock: once
    the lease has expired, the standby ends that session and takes the next epoch."""
    first = await opened(pg_schema_url, line)
    frozen = await first.acquire_lease(ttl_s=0.8)  # nobody runs frozen.keep(): no renewals
    second = await opened(pg_schema_url, line)
    try:
        async with asyncio.timeout(5):
            taken = await second.acquire_lease(standby=True, ttl_s=0.8)
        assert taken.epoch == frozen.epoch + 1
        assert taken.took_over is not None and taken.took_over[0] >= 0
        with pytest.raises(LeaseLost, match="ran out"):
            frozen.check()
        sessions = raw(
            pg_schema_url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'linectl % lease'",
        )
        assert sessions == [(1,)]  # the standby's; the frozen owner's was ended
        keep = asyncio.create_task(frozen.keep())
        with pytest.raises(LeaseLost):
            async with asyncio.timeout(5):
                await keep
        await taken.release()
        await frozen.release()
        with pytest.raises(StoreError, match="no longer owns the line"):
            await first.unit_released(9, f"{line}-9", NOW)
            await first.flush()
    finally:
        await second.close()
        with pytest.raises(StoreError):
            await first.close()


async def test_a_plain_run_waits_out_an_owner_whose_session_is_gone(pg_schema_url, line):  # noqa: F811
    """After a kill -9 the lock is free at once but the lease runs to its end: a restart
    waits for it (the old owner may command until then) instead of refusing."""
    first = await opened(pg_schema_url, line)
    dead = await first.acquire_lease(ttl_s=1.0)
    raw(
        pg_schema_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'linectl % lease'",
    )
    second = await opened(pg_schema_url, line)
    try:
        async with asyncio.timeout(5):
            taken = await second.acquire_lease(ttl_s=1.0)
        assert taken.epoch == dead.epoch + 1
        await taken.release()
        await dead.release()
    finally:
        await second.close()
        await first.close()
