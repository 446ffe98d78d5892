"""Crash recovery: kill -9 the supervisor (a real `linectl run` process) at random moments,
restart it, and still lose no unit and run no step twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from linectl.config import parse_config
from linectl.flow import compile_flow
from linectl.store import TraceStore
from simulators.runner import SimLine
from tests.helpers import eventually
from tests.pg import pg_url  # noqa: F401  (fixture)

UNITS = 30
KILLS = 20

LINE = """
line: crash
time_scale: 0.01
plcs:
  p0: {{protocol: modbus, host: 127.0.0.1, port: {p0}, poll_interval_s: 0.005, timeout_s: 0.5}}
  p1: {{protocol: modbus, host: 127.0.0.1, port: {p1}, poll_interval_s: 0.005, timeout_s: 0.5}}
stations:
  load:    {{plc: p0, address: 0,   cycle_s: 3}}
  weld_1:  {{plc: p0, address: 40,  cycle_s: 6}}
  weld_2:  {{plc: p1, address: 0,   cycle_s: 6}}
  label:   {{plc: p1, address: 40,  cycle_s: 2}}
  scan:    {{plc: p0, address: 80,  cycle_s: 3}}
  pack:    {{plc: p1, address: 80,  cycle_s: 3, capacity: 2}}
flow:
  - load
  - route: {{policy: round_robin, branches: [[weld_1], [weld_2]]}}
  - fork: [[label], [scan]]
  - pack
release: {{count: {units}}}
storage: {{url: "{db}"}}
metrics: {{port: 0}}
api: {{port: 0}}
"""


def spawn(config: Path) -> asyncio.subprocess.Process:
    return asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "linectl.cli",
        "run",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def crash_and_resume(tmp_path: Path, db: str) -> None:
    rng = random.Random(20261128)
    template = parse_config(LINE.format(p0=0, p1=0, units=UNITS, db=db))
    async with SimLine(template, free_ports=True, heartbeat_period_s=0.05) as sim:
        ports = {name: plc.port for name, plc in sim.line.plcs.items()}
        config = tmp_path / "crash.yaml"
        config.write_text(LINE.format(p0=ports["p0"], p1=ports["p1"], units=UNITS, db=db))

        def cycles() -> int:
            return sum(sum(c.values()) for c in sim.completions().values())

        kills = 0
        for _ in range(KILLS):
            proc = await spawn(config)
            # A random moment: after a random number of further cycles anywhere on the line.
            target = cycles() + rng.randint(1, 4)
            await eventually(
                lambda t=target, p=proc: cycles() >= t or p.returncode is not None,
                within=20,
                what="the line to move",
            )
            if proc.returncode is not None:
                break
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1
        assert kills == KILLS, f"the line finished after {kills} kills; give it more units"
        proc = await spawn(config)  # the last run goes to the end
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]

        line = parse_config(config.read_text())
        flow = compile_flow(line)
        async with await TraceStore.open(db, line.line, create=False) as store:
            units = await store.units()
        assert len(units) == UNITS
        assert {u.status for u in units} <= {"finished", "quarantined"}
        counts = sim.completions()
        for unit in units:
            if unit.status != "finished":
                continue
            passed = [s for s in unit.steps if s.result == "pass"]
            stations = [s.station for s in passed]
            # Its whole path: load, one weld, both fork branches, pack; each once, in order.
            assert stations[0] == "load" and stations[-1] == "pack", stations
            assert sorted(stations[1:-1]) in (
                ["label", "scan", "weld_1"],
                ["label", "scan", "weld_2"],
            ), stations
            assert len(set(stations)) == len(stations) == 5
            for step in passed:
                assert (
                    step.commanded_at and step.finished_at and step.finished_at >= step.commanded_at
                )
                assert step.status == "done"
            for name in flow.stations:
                ran = counts[name][unit.unit_id]
                assert ran == (1 if name in stations else 0), (unit.serial, name, ran)


# 20 controller processes started and killed: a minute on a quiet machine, more under load.
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_kill_9_at_random_moments_loses_nothing_and_runs_nothing_twice_sqlite(tmp_path):
    await crash_and_resume(tmp_path, f"sqlite:///{tmp_path / 'crash.sqlite3'}")


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_kill_9_at_random_moments_loses_nothing_and_runs_nothing_twice_postgres(
    tmp_path,
    pg_url,  # noqa: F811
):
    await crash_and_resume(tmp_path, pg_url)


async def test_a_plc_unreachable_at_restart_holds_up_only_the_units_that_need_it(tmp_path):
    """Crash with units on both parallel lines; restart with line 2's PLC down: line 1's units
    carry on at once, line 2's wait for their PLC and then finish. Nothing is lost or rerun."""
    from linectl.journal import Journal
    from linectl.supervisor import Supervisor
    from tests.test_supervisor import make_line

    line = parse_config(
        make_line(
            {"l1": "cycle_s: 4", "l2": "cycle_s: 4"},
            "[{route: {policy: round_robin, branches: [[l1], [l2]]}}]",
            plcs=2,
            extra="release: {count: 16}",
        )
    )
    db = f"sqlite:///{tmp_path / 'resume.sqlite3'}"
    async with SimLine(line, free_ports=True, heartbeat_period_s=0.05) as sim:
        async with await TraceStore.open(db, line.line) as store:
            first = Supervisor(sim.line, journal=Journal(store))
            task = asyncio.create_task(first.run())
            await eventually(
                lambda: first.finished >= 4 and all(st.load() for st in first.stations.values()),
                what="units in process on both lines",
            )
            task.cancel()  # the controller dies with steps open on both PLCs
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await sim.servers["p1"].stop()
        async with await TraceStore.open(db, line.line) as store:
            second = Supervisor(sim.line, journal=Journal(store), exit_when_done=True)
            second.on_event = second.check_invariants
            task = asyncio.create_task(second.run())
            resumed = await eventually(lambda: second.recovered, what="recovery")
            assert resumed >= 2
            done = second.finished
            await eventually(lambda: second.finished >= done + 3, what="line 1 carrying on")
            assert not second.stations["l2"].connected
            await sim.servers["p1"].start()
            async with asyncio.timeout(20):
                await task
            units = await store.units()
    assert len(units) == 16 and {u.status for u in units} == {"finished"}
    for name in ("l1", "l2"):
        assert max(sim.completions()[name].values()) == 1


async def test_a_supervisor_with_a_store_returns_and_leaves_everything_committed(tmp_path):
    """Stopping commits what the journal holds before its task ends: nothing is left queued
    behind a cancelled writer (that hung the supervisor at exit)."""
    from linectl.journal import Journal
    from linectl.supervisor import Supervisor
    from tests.test_supervisor import make_line

    line = parse_config(
        make_line({"a": "cycle_s: 1", "b": "cycle_s: 1"}, "[a, b]", extra="release: {count: 5}")
    )
    db = f"sqlite:///{tmp_path / 'exit.sqlite3'}"
    async with SimLine(line, free_ports=True, heartbeat_period_s=0.05) as sim:
        for _ in range(3):
            async with await TraceStore.open(db, line.line) as store:
                sup = Supervisor(sim.line, journal=Journal(store), exit_when_done=True)
                async with asyncio.timeout(15):
                    await sup.run()
                line = line.model_copy(
                    update={
                        "release": line.release.model_copy(update={"count": line.release.count + 5})
                    }
                )
                sim_line = sim.line.model_copy(update={"release": line.release})
                sim.line = sim_line
    async with await TraceStore.open(db, "t", create=False) as store:
        units = await store.units()
    assert len(units) == 15 and {u.status for u in units} == {"finished"}
    assert all(s.status == "done" for u in units for s in u.steps)
