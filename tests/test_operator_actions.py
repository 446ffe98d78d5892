"""Operator actions with a trace store: journalled before they take effect, put back on restart.

Each test runs the supervisor against the bundled simulators with a real SQLite trace store,
stops it, and starts a new one on the same database and the same (still running) PLCs, as a
restarted controller would find them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import Line, parse_config
from linectl.contract import State
from linectl.journal import Journal
from linectl.store import TraceStore
from linectl.supervisor import Supervisor
from simulators.runner import SimLine
from tests.helpers import eventually
from tests.test_supervisor import make_line


@contextlib.asynccontextmanager
async def supervisor(line: Line, url: str, **kwargs) -> AsyncIterator[Supervisor]:
    """One controller's life: open the store, run, stop (draining), close the store."""
    async with await TraceStore.open(url, line.line) as store:
        sup = Supervisor(line, journal=Journal(store), **kwargs)
        sup.on_event = sup.check_invariants
        task = asyncio.create_task(sup.run(), name="supervisor")
        try:
            yield sup
        finally:
            sup.stop()
            async with asyncio.timeout(15):
                await task


def no_faults(sim: SimLine, station: str) -> None:
    cfg = sim.station(station).config
    sim.station(station).config = cfg.model_copy(
        update={"sim": cfg.sim.model_copy(update={"fault_p": 0.0, "reject_p": 0.0})}
    )


async def idle(sup: Supervisor, station: str) -> None:
    await eventually(
        lambda: all(
            s.status and s.status.state == State.IDLE and not s.busy
            for s in sup.stations[station].slots
        ),
        what=f"{station} idle",
    )


async def rejected_at_b(sup: Supervisor, sim: SimLine) -> None:
    """Wait for LINE's unit to be quarantined at b and b to be Idle again; then b passes all."""
    await eventually(lambda: sup.quarantined, what="a unit quarantined at b")
    await idle(sup, "b")
    no_faults(sim, "b")


LINE = make_line(
    {"a": "cycle_s: 1", "b": "cycle_s: 1, sim: {reject_p: 1.0}", "c": "cycle_s: 1"},
    "[a, b, c]",
    extra="release: {count: 1}\nretry: {attempts: 1, backoff_s: 0}",
)


async def test_a_released_unit_runs_again_where_it_failed_with_its_next_attempt(tmp_path):
    """With a trace store, a release used to reuse attempt 1 and kill the controller on the
    steps table's unique key."""
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.05) as sim:
        async with supervisor(sim.line, url) as sup:
            await rejected_at_b(sup, sim)
            sup.release_quarantined(1)
            await sup.wait_durable()
            await eventually(lambda: sup.finished == 1, what="the released unit to finish")
    async with await TraceStore.open(url, "t") as store:
        trace = await store.trace("t-000001")
    assert [(s.station, s.attempt, s.result) for s in trace.steps] == [
        ("a", 1, "pass"),
        ("b", 1, "reject"),
        ("b", 2, "pass"),
        ("c", 1, "pass"),
    ]
    assert trace.unit.status == "finished"
    assert [q.released_at is not None for q in trace.quarantines] == [True]
    async with await TraceStore.open(url, "t") as store:
        actions = await store.operator_actions()
    assert [(a.action, a.target) for a in actions] == [("release", "t-000001")]


async def test_release_drain_and_pause_survive_a_restart(tmp_path):
    """Released, with its station drained, then restarted: the unit is not quarantined again,
    the station stays out of service, and the unit resumes where it failed once it is back."""
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.05) as sim:
        async with supervisor(sim.line, url) as sup:
            await rejected_at_b(sup, sim)
            sup.set_in_service("b", False)
            sup.release_quarantined(1)
            sup.pause(True)
            await sup.wait_durable()
        async with supervisor(sim.line, url) as sup:
            await eventually(lambda: sup.stations["b"].connected, what="b connected")
            assert not sup.quarantined and list(sup.units) == [1]
            assert not sup.stations["b"].in_service
            assert sup.paused
            sup.set_in_service("b", True)
            await eventually(lambda: sup.finished == 1, what="the unit to finish after b is back")
    assert sim.station("a").completions[1] == 1  # not sent through 'a' again
    assert sim.station("b").completions[1] == 2  # the reject, then the pass after release
    config = tmp_path / "line.yaml"
    config.write_text(LINE)
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["actions", str(config), "--db", url])
    assert shown.exit_code == 0, shown.output
    assert [line.split()[2:4] for line in shown.output.splitlines()] == [
        ["out_of_service", "b"],
        ["release", "t-000001"],
        ["pause", "(operator)"],
        ["in_service", "b"],
    ]


async def test_a_unit_released_after_a_restart_goes_back_where_it_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.05) as sim:
        async with supervisor(sim.line, url) as sup:
            await rejected_at_b(sup, sim)
        async with supervisor(sim.line, url) as sup:
            await eventually(lambda: sup.stations["b"].connected, what="b connected")
            assert list(sup.quarantined) == [1]
            sup.release_quarantined(1)
            await eventually(lambda: sup.finished == 1, what="the released unit to finish")
    assert sim.station("a").completions[1] == 1
    assert sim.station("b").completions[1] == 2


async def test_a_restart_with_every_unit_done_exits_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    line = make_line({"a": "cycle_s: 1"}, "[a]", extra="release: {count: 2}")
    async with SimLine(parse_config(line), free_ports=True, heartbeat_period_s=0.05) as sim:
        finished = []
        for _ in range(2):
            async with await TraceStore.open(url, "t") as store:
                sup = Supervisor(sim.line, journal=Journal(store), exit_when_done=True)
                async with asyncio.timeout(10):  # the second used to wait for ever
                    await sup.run()
            finished.append((sup.released, sup.finished))
    assert finished == [(2, 2), (0, 0)]


async def test_a_capacity_cut_under_a_unit_in_the_line_quarantines_it_with_the_reason(tmp_path):
    """Restarted with a capacity below the slot a unit is in: quarantined with a clear reason
    instead of an IndexError on every start."""
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    line = make_line(
        {"a": "cycle_s: 0.1", "z": "cycle_s: 1000, capacity: 2"},
        "[a, z]",
        extra="release: {count: 2}",
    )
    async with SimLine(parse_config(line), free_ports=True, heartbeat_period_s=0.05) as sim:
        async with supervisor(sim.line, url, drain_timeout_s=0.05) as sup:
            await eventually(
                lambda: all(s.occupant for s in sup.stations["z"].slots), what="z holds two"
            )
        z = sim.line.stations["z"].model_copy(update={"capacity": 1})
        smaller = sim.line.model_copy(update={"stations": {**sim.line.stations, "z": z}})
        async with supervisor(smaller, url) as sup:
            await eventually(lambda: sup.quarantined, what="the unit in slot 1 quarantined")
            (unit,) = sup.quarantined.values()
            assert "slot 1 of 'z', which now has capacity 1" in unit.reason
            assert len(sup.units) == 1


async def test_the_api_answers_an_action_only_once_it_is_journalled(tmp_path):
    """When ctl says a station is drained, the drain is in the trace store: a controller
    killed right after the answer still finds the station drained when it restarts."""
    from linectl.api import serve_api
    from tests.test_api import call

    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    line = make_line({"a": "cycle_s: 1"}, "[a]", extra="release: {count: 1}\napi: {port: 0}")
    async with SimLine(parse_config(line), free_ports=True, heartbeat_period_s=0.05) as sim:
        async with supervisor(sim.line, url) as sup:
            api = await serve_api(sup, sim.line)
            try:
                status, _ = await asyncio.to_thread(
                    call, api.port, "POST", "/station", {"station": "a", "in_service": False}
                )
                assert status == 200
                # Read through a second connection, as the next controller would.
                async with await TraceStore.open(url, "t") as other:
                    actions = await other.operator_actions()
                    state = await other.operator_state()
            finally:
                await api.stop()
    assert [(a.action, a.target) for a in actions] == [("out_of_service", "a")]
    assert actions[0].detail.startswith("api ")
    assert state.out_of_service == frozenset({"a"})
