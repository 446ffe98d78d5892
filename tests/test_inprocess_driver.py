"""The in-process PLC driver: the station program behind the driver interface, on a virtual clock.

These tests run on the virtual-time loop (linectl/virtual.py): the clock jumps to the next timer,
so a cycle of an hour completes at once and every time is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator

import pytest

from linectl.config import Line, parse_config
from linectl.contract import CmdStatus, Command, Result, State
from linectl.drivers.base import ConnectionChange, DriverEvent, SlotUpdate, StationViolation
from linectl.drivers.inprocess import InProcessDriver, ScriptedCycle
from linectl.errors import CommandRefused, PlcConnectionLost, PlcTimeout
from linectl.supervisor import Supervisor
from tests.virtualtime import run_virtual

LINE = """
line: inprocess
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 502, timeout_s: 0.5}
stations:
  a: {plc: p, address: 0, cycle_s: 3600}
  b: {plc: p, address: 24, cycle_s: 10, capacity: 2,
      sim: {distribution: lognormal, spread: 0.3, reject_p: 0.2, fault_p: 0.1, fault_code: 7}}
flow: [a, b]
release: {count: 20}
"""


class Sink:
    def __init__(self) -> None:
        self.events: list[DriverEvent] = []
        self.changed = asyncio.Event()

    def __call__(self, event: DriverEvent) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait_for(self, station: str, slot: int, state: State) -> SlotUpdate:
        while True:
            for e in self.events:
                if (
                    isinstance(e, SlotUpdate)
                    and not e.resync
                    and (e.station, e.slot, e.status.state) == (station, slot, state)
                ):
                    self.events.remove(e)
                    return e
            self.changed.clear()
            await self.changed.wait()

    def updates(self, station: str, slot: int = 0) -> list[SlotUpdate]:
        return [
            e
            for e in self.events
            if isinstance(e, SlotUpdate) and (e.station, e.slot) == (station, slot) and not e.resync
        ]


@contextlib.asynccontextmanager
async def running(line: Line, **options) -> AsyncIterator[tuple[InProcessDriver, Sink]]:
    sink = Sink()
    stations = {n: s for n, s in line.stations.items() if s.plc == "p"}
    driver = InProcessDriver("p", line.plcs["p"], stations, sink, **options)
    task = asyncio.create_task(driver.run())
    try:
        async with asyncio.timeout(1):
            await driver.wait_connected()
        yield driver, sink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_unit_runs_the_handshake_in_line_seconds_without_waiting():
    """An hour-long cycle completes exactly one hour of loop time after its START."""

    async def main():
        loop = asyncio.get_running_loop()
        async with running(parse_config(LINE)) as (driver, sink):
            resync = [e for e in sink.events if isinstance(e, SlotUpdate)]
            assert [(e.station, e.slot, e.resync) for e in resync] == [
                ("a", 0, True),
                ("b", 0, True),
                ("b", 1, True),
            ]
            assert isinstance(sink.events[3], ConnectionChange) and sink.events[3].connected
            started_at = loop.time()
            started = await driver.command("a", 0, 1, Command.START, 41)
            assert (started.ack_seq, started.cmd_status, started.state) == (
                1,
                CmdStatus.ACCEPTED,
                State.EXECUTE,
            )
            done = await sink.wait_for("a", 0, State.COMPLETE)
            assert done.at - started_at == 3600.0
            assert (done.status.unit, done.status.result) == (41, Result.PASS)
            assert done.status.cycle_time_ms == 3_600_000
            await driver.command("a", 0, 2, Command.RESET, 0)
            idle = await sink.wait_for("a", 0, State.IDLE)
            assert (idle.status.ack_seq, idle.status.unit) == (2, 0)
            # One update per scan: the echo and Execute arrive together, never half a change.
            assert [e.status.state for e in sink.updates("a")] == [State.EXECUTE]
            assert driver.executions()[("a", 0)] == {41: 1}
            stats = driver.statistics()
            assert (stats.protocol, stats.connected, stats.requests, stats.errors) == (
                "inprocess",
                True,
                2,
                0,
            )
            assert stats.since_connected_s == loop.time() - 0.0

    run_virtual(main)


def test_a_sequence_number_is_evaluated_once_and_refusals_raise():
    async def main():
        loop = asyncio.get_running_loop()
        async with running(parse_config(LINE)) as (driver, _):
            await driver.command("a", 0, 5, Command.START, 8)
            again = await driver.command("a", 0, 5, Command.START, 8)
            assert again.ack_seq == 5
            assert driver.executions()[("a", 0)] == {8: 1}
            with pytest.raises(CommandRefused, match=r"station 'a' slot 0: .*REFUSED_STATE"):
                await driver.command("a", 0, 6, Command.START, 9)
            with pytest.raises(CommandRefused, match="REFUSED_UNIT"):
                await driver.command("b", 1, 1, Command.START, 0)
            # A stale number is never echoed: the caller's deadline passes, in loop time.
            before = loop.time()
            with pytest.raises(PlcTimeout, match=r"no echo of seq 3 within 0\.5 s"):
                await driver.command("a", 0, 3, Command.START, 8)
            assert loop.time() - before == 0.5
            with pytest.raises(ValueError, match=r"slot 2 outside 0\.\.1"):
                await driver.command("b", 2, 1, Command.START, 1)

    run_virtual(main)


async def _cycles(line: Line, n: int, **options) -> list[tuple[float, Result, int]]:
    """Run ``n`` units through station b's slot 0; what each cycle did (time, result, fault)."""
    out = []
    async with running(line, **options) as (driver, sink):
        loop = asyncio.get_running_loop()
        seq = 0
        for unit in range(1, n + 1):
            seq += 1
            started = loop.time()
            mark = len(sink.updates("b"))
            await driver.command("b", 0, seq, Command.START, unit)
            while True:
                sink.changed.clear()
                news = sink.updates("b")[mark:]
                if news and news[-1].status.state in (State.COMPLETE, State.ABORTED):
                    status = news[-1].status
                    break
                await sink.changed.wait()
            out.append((round(loop.time() - started, 9), status.result, status.fault_code))
            seq += 1
            await driver.command("b", 0, seq, Command.RESET, 0)
    return out


def test_cycles_follow_the_sim_section_and_the_seed():
    line = parse_config(LINE)
    first = run_virtual(functools.partial(_cycles, line, 200, seed=1))
    assert first == run_virtual(functools.partial(_cycles, line, 200, seed=1))
    assert first != run_virtual(functools.partial(_cycles, line, 200, seed=2))
    completed = [t for t, _, fault in first if not fault]
    mean = sum(completed) / len(completed)
    assert len(set(completed)) > 100 and 8 < mean < 12  # lognormal around cycle_s 10
    faults = [f for _, _, f in first if f]
    rejects = [r for _, r, f in first if not f and r == Result.REJECT]
    assert set(faults) == {7} and 8 <= len(faults) <= 35  # fault_p 0.1 of 200
    assert 15 <= len(rejects) <= 60  # reject_p 0.2 of the completed
    # Without a seed override, the station's own derivation is repeatable too.
    assert run_virtual(functools.partial(_cycles, line, 20)) == run_virtual(
        functools.partial(_cycles, line, 20)
    )


def test_a_script_replays_recorded_cycles_then_draws_again():
    script = [
        ScriptedCycle(4.5),
        ScriptedCycle(2.0, Result.REJECT),
        (1.25, Result.PASS, 3),  # a fault 1.25 s into the cycle
    ]
    line = parse_config(LINE)
    cycles = run_virtual(functools.partial(_cycles, line, 5, scripts={"b": script}))
    assert cycles[:3] == [(4.5, Result.PASS, 0), (2.0, Result.REJECT, 0), (1.25, Result.NONE, 3)]
    assert all(t != 4.5 for t, _, _ in cycles[3:])  # drawn from sim: again
    repeated = run_virtual(
        functools.partial(_cycles, line, 6, scripts={"b": itertools.cycle(script[:2])})
    )
    assert [t for t, _, _ in repeated] == [4.5, 2.0] * 3


def test_an_out_of_contract_value_is_a_violation_told_once_and_cleared():
    async def main():
        async with running(parse_config(LINE)) as (driver, sink):
            station = driver.plc.stations["b"]
            station.violate("state", 1)
            await asyncio.sleep(0.1)
            station.violate("state", 1)  # the same bad value again: not told again
            await asyncio.sleep(0.1)
            violations = [e for e in sink.events if isinstance(e, StationViolation)]
            assert len(violations) == 1
            assert str(violations[0].error) == (
                "plc 'p' (in-process) station 'b' slot 1: unknown state code 99"
            )
            station.power_up()  # back to exactly the status it had before
            await asyncio.sleep(0.1)
            assert [e.status.state for e in sink.updates("b", 1)] == [State.IDLE]

    run_virtual(main)


def test_an_unreachable_plc_is_lost_and_resynced_when_back():
    async def main():
        async with running(parse_config(LINE)) as (driver, sink):
            driver.set_reachable(False)
            await asyncio.sleep(0)  # the session ends on the next turn
            assert not driver.connected
            assert sink.events[-1] == ConnectionChange(
                "p", False, "plc 'p' (in-process): unreachable", 0.0
            )
            with pytest.raises(PlcConnectionLost, match="station 'a' slot 0: not connected"):
                await driver.command("a", 0, 1, Command.START, 1)
            driver.plc.stations["a"].command(0, 1, Command.START, 5)  # changes meanwhile
            mark = len(sink.events)
            driver.set_reachable(True)
            await driver.wait_connected()
            back = sink.events[mark:]
            first = next(e for e in back if isinstance(e, SlotUpdate))
            assert (first.station, first.status.state, first.resync) == ("a", State.EXECUTE, True)
            assert driver.statistics().reconnects == 1
            lost = [e for e in sink.events if isinstance(e, ConnectionChange) and not e.connected]
            assert len(lost) == 1 and "unreachable" in lost[0].reason

    run_virtual(main)


def test_the_supervisor_runs_a_line_on_it_in_virtual_time():
    """Built by the supervisor's driver_factory; every unit ran once at every station it
    finished, and a long run takes no wall time."""
    line = parse_config(LINE.replace("cycle_s: 3600", "cycle_s: 5"))
    drivers: list[InProcessDriver] = []

    def factory(*args):
        drivers.append(InProcessDriver(*args, seed=3))
        return drivers[-1]

    async def main():
        sup = Supervisor(line, driver_factory=factory, exit_when_done=True)
        sup.on_event = sup.check_invariants
        async with asyncio.timeout(100_000):
            await sup.run()
        return sup, asyncio.get_running_loop().time()

    sup, elapsed = run_virtual(main)
    assert sup.finished + len(sup.quarantined) == 20
    assert sup.finished >= 8  # some are rejected at b
    assert elapsed > 20 * 5  # a is the bottleneck: 5 s per unit
    (driver,) = drivers
    runs = driver.executions()
    # Station a (no faults, no rejects) ran every unit exactly once.
    assert sorted(runs[("a", 0)]) == list(range(1, 21))
    assert set(runs[("a", 0)].values()) == {1}
