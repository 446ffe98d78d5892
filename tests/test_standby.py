"""Hot standby with real processes: two `linectl run` on one PostgreSQL line. The owner is
killed (-9), frozen (SIGSTOP) or cut off from the database; the standby takes over within 5 s
of the lease expiring, and no unit is lost and no step runs twice (the simulators' execution
counters against the trace). A frozen owner that wakes up exits without touching anything."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conservation import conservation
from tests.faultproxy import FaultProxy
from tests.helpers import eventually
from tests.pg import pg_schema_url, pg_url  # noqa: F401  (fixtures)
from tests.standby import FIRST_COMMAND, Controller, cycles, plant, trace

UNITS = 80
LEASE = "2"
LOST = "no longer owns the line"


async def moves(sim, more: int) -> None:
    target = cycles(sim) + more
    await eventually(lambda: cycles(sim) >= target, within=20, what=f"{more} more cycles")


Fault = Callable[[Controller, Controller, FaultProxy | None], Awaitable[None]]


async def takeover(tmp_path: Path, db: str, fault: Fault, *, via_proxy: bool = False) -> None:
    name = f"standby_{secrets.token_hex(3)}"
    async with plant(tmp_path, db, name=name, units=UNITS) as (sim, config):
        proxy = None
        owner_args = ["--lease-s", LEASE]
        if via_proxy:
            pg = urlsplit(db)
            proxy = FaultProxy((pg.hostname or "127.0.0.1", pg.port or 5432))
            await proxy.start()
            netloc = pg.netloc.rsplit(":", 1)[0] if ":" in pg.netloc else pg.netloc
            owner_args += ["--db", urlunsplit(pg._replace(netloc=f"{netloc}:{proxy.port}"))]
        owner = await Controller.start(config, *owner_args, name="owner")
        standby = None
        try:
            await owner.said("running line")
            standby = await Controller.start(
                config, "--standby", "--lease-s", LEASE, name="standby"
            )
            await standby.said("standing by for its lease")
            await moves(sim, 2)
            await fault(owner, standby, proxy)
            took = await standby.said(FIRST_COMMAND)
            assert float(took[1]) < 5.0, took[0]
            assert await standby.exited(within=60) == 0, standby.text[-3000:]
        except Exception:
            for proc in (owner, standby):
                if proc is not None:
                    print(f"--- {proc.name} (exit {proc.proc.returncode}):\n{proc.text[-4000:]}")
            raise
        finally:
            for proc in (owner, standby):
                if proc is not None:
                    await proc.close()
            if proxy is not None:
                await proxy.stop()
        units = await trace(db, name)
        found = conservation(units, sim.completions())
        assert found.units == UNITS and found.finished + found.quarantined == UNITS
        assert not found.problems, found.problems
        # Both owners commanded: the takeover happened in the middle of the run.
        assert "took over (epoch" in standby.text


async def kill_9(owner: Controller, standby: Controller, _proxy) -> None:
    owner.signal(signal.SIGKILL)
    assert await owner.exited(within=10) == -signal.SIGKILL


async def freeze_then_wake(owner: Controller, standby: Controller, _proxy) -> None:
    """SIGSTOP; once the standby runs the line, SIGCONT: the old owner finds its lease gone
    before any command, its writes refused, and exits with one clear line."""
    owner.signal(signal.SIGSTOP)
    try:
        await standby.said(FIRST_COMMAND)
    finally:
        owner.signal(signal.SIGCONT)
    assert await owner.exited(within=20) == 2, owner.text[-3000:]
    last = owner.lines[-1]
    assert LOST in last and "Traceback" not in owner.text, owner.text[-3000:]


async def cut_off_from_the_database(owner: Controller, standby: Controller, proxy) -> None:
    """The owner's database connections go silent (a partition): it cannot renew, stops
    commanding when its lease may have run out, and exits; the standby takes over."""
    proxy.blackhole()
    assert await owner.exited(within=30) == 2, owner.text[-3000:]
    assert LOST in owner.lines[-1], owner.text[-3000:]


@pytest.mark.slow
async def test_a_standby_takes_over_from_a_killed_owner_losing_nothing(
    tmp_path,
    pg_schema_url,  # noqa: F811
):
    await takeover(tmp_path, pg_schema_url, kill_9)


@pytest.mark.slow
async def test_a_frozen_owner_is_replaced_and_on_waking_touches_nothing(
    tmp_path,
    pg_schema_url,  # noqa: F811
):
    await takeover(tmp_path, pg_schema_url, freeze_then_wake)


@pytest.mark.slow
async def test_an_owner_cut_off_from_the_database_stops_and_the_standby_takes_over(
    tmp_path,
    pg_schema_url,  # noqa: F811
):
    await takeover(tmp_path, pg_schema_url, cut_off_from_the_database, via_proxy=True)


@pytest.mark.slow
async def test_a_second_run_on_a_held_line_is_refused_with_one_line(tmp_path, pg_schema_url):  # noqa: F811
    name = f"held_{secrets.token_hex(3)}"
    async with plant(tmp_path, pg_schema_url, name=name, units=1000) as (_sim, config):
        owner = await Controller.start(config, name="owner")
        second = None
        try:
            await owner.said("running line")
            second = await Controller.start(config, name="second")
            assert await second.exited(within=30) == 2
            assert len(second.lines) == 1, second.text
            assert f"line '{name}' is held by host " in second.lines[0]
            assert f" pid {owner.proc.pid} since " in second.lines[0]
            assert "run with --standby" in second.lines[0]
            owner.signal(signal.SIGTERM)
            assert await owner.exited(within=30) == 0
        finally:
            for proc in (owner, second):
                if proc is not None:
                    await proc.close()
