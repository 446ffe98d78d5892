"""What only the Modbus driver does, against the Modbus simulator on real sockets: one write per
command, register numbers in messages, half-open connections, reads packed per poll. What every
driver does is tests/test_driver_behaviour.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from linectl.config import Line, Station, parse_config
from linectl.contract import HEADER_WORDS, S_STATE, SLOT_WORDS, Command, State
from linectl.drivers.base import StationViolation
from linectl.drivers.modbus import ModbusDriver, plan_reads
from linectl.errors import PlcConnectionLost, PlcTimeout
from simulators.runner import SimLine
from tests.helpers import eventually
from tests.test_driver_behaviour import Events

PLC = (
    "{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.01, timeout_s: 0.2, "
    "connect_timeout_s: 0.5, heartbeat_timeout_s: 0.3, backoff_initial_s: 0.02, "
    "backoff_max_s: 0.1}"
)


def line_of(stations: str, plc: str = PLC) -> Line:
    return parse_config(
        f"""
line: modbus_driver
time_scale: 0.01
plcs:
  p: {plc}
stations:
{stations}
flow: [s1]
"""
    )


LINE = line_of(
    """
  s1: {plc: p, address: 0, cycle_s: 2.0}
  s2: {plc: p, address: 24, cycle_s: 2.0}
  s3: {plc: p, address: 48, cycle_s: 2.0}
  slow: {plc: p, address: 72, cycle_s: 5.0, capacity: 2}
"""
)


def stations_of(line: Line, plc: str = "p") -> dict[str, Station]:
    return {n: st for n, st in line.stations.items() if st.plc == plc}


@contextlib.asynccontextmanager
async def running(
    line: Line, *, connected: bool = True
) -> AsyncIterator[tuple[ModbusDriver, Events]]:
    events = Events()
    driver = ModbusDriver("p", line.plcs["p"], stations_of(line), events)  # type: ignore[arg-type]
    task = asyncio.create_task(driver.run(), name="modbus-driver-p")
    try:
        if connected:
            await events.connection(True)
        yield driver, events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def sim() -> AsyncIterator[SimLine]:
    async with SimLine(LINE, free_ports=True, heartbeat_period_s=0.005) as sim:
        yield sim


async def test_a_command_is_one_write_of_the_command_area(sim):
    server = sim.servers["p"]
    async with running(sim.line) as (driver, _):
        before = server.requests["write"]
        await driver.command("s2", 0, 1, Command.START, 3)
        assert server.requests["write"] - before == 1
        assert server.requests["write_single"] == 0


async def test_a_half_open_connection_is_detected_by_request_deadlines(sim):
    server = sim.servers["p"]
    async with running(sim.line) as (driver, events):
        server.stall()
        lost = await events.connection(False, within=2)
        assert "no answer to 2 requests in a row" in lost.reason
        assert driver.statistics().errors >= 2
        server.stall(False)
        await events.connection(True)


async def test_a_command_to_a_stalled_plc_fails_within_its_deadline(sim):
    async with running(sim.line) as (driver, _):
        sim.servers["p"].stall()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises((PlcTimeout, PlcConnectionLost), match="station 's1' slot 0"):
            await driver.command("s1", 0, 1, Command.START, 1)
        # Waiting behind a poll's read and the write each have their own deadline.
        assert loop.time() - started <= 2 * sim.line.plcs["p"].timeout_s + 0.1


async def test_cancelling_the_driver_mid_request_propagates(sim):
    events = Events()
    driver = ModbusDriver("p", sim.line.plcs["p"], stations_of(sim.line), events)
    task = asyncio.create_task(driver.run())
    async with asyncio.timeout(3):
        await driver.wait_connected()
    sim.servers["p"].stall()
    sent = driver.statistics().requests
    # A request sent from now on hangs (deadline 0.2 s): cancel while it does.
    await eventually(lambda: driver.statistics().requests > sent, what="a request in flight")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1):
            await task
    assert not driver.connected


async def test_out_of_contract_values_are_reported_while_other_stations_keep_going(sim):
    async with running(sim.line) as (driver, events):
        await driver.command("s3", 0, 1, Command.START, 30)
        await events.slot("s3", State.COMPLETE)
        sim.station("s1").violate("state")
        sim.station("s2").violate("unit")
        sim.station("s3").violate("seq")
        violations: dict[str, str] = {}
        while len(violations) < 3:  # in whatever order the polls find them
            event = await events.next(lambda e: isinstance(e, StationViolation), what="violation")
            assert isinstance(event, StationViolation)
            violations[event.station] = str(event.error)
        port = sim.line.plcs["p"].port
        where = f"plc 'p' (127.0.0.1:{port})"
        state_register = 0 + HEADER_WORDS + S_STATE
        assert violations["s1"] == (
            f"{where} station 's1' slot 0: unknown state code 99 at register {state_register}"
        )
        assert violations["s2"].startswith(f"{where} station 's2' slot 0: unit {0x7000_0000}")
        assert "neither there at connect nor commanded" in violations["s2"]
        assert violations["s3"] == (
            f"{where} station 's3' slot 0: echoed sequence number went back from 1 to 0 "
            f"at register {48 + HEADER_WORDS + 6}"
        )
        # The other station still runs, and each violation was reported once.
        await driver.command("slow", 0, 1, Command.START, 9)
        await events.slot("slow", State.COMPLETE)
        assert driver.connected
        assert sum(isinstance(e, StationViolation) for e in events.seen) == 3


FIFTY = line_of(
    "\n".join(f"  s{i + 1}: {{plc: p, address: {i * 24}, cycle_s: 2.0}}" for i in range(50))
)


async def test_fifty_stations_share_one_connection_and_the_fewest_reads():
    reads = plan_reads(stations_of(FIFTY))
    # 50 blocks of 24 registers: five per read of <= 125 registers.
    assert [(r.start, r.count, len(r.stations)) for r in reads] == [
        (i * 120, 120, 5) for i in range(10)
    ]
    async with SimLine(FIFTY, free_ports=True, heartbeat_period_s=0.005) as sim:
        server = sim.servers["p"]
        async with running(sim.line) as (driver, events):
            await driver.command("s50", 0, 1, Command.START, 50)
            await events.slot("s50", State.COMPLETE)
            polls_before = driver.polls_started
            await eventually(lambda: driver.polls_started >= polls_before + 5, what="5 polls")
            assert server.client_count == 1
        assert server.connections_accepted == 1
        # Every poll is ten reads; the one running when the driver stopped may be cut short.
        polls, served = driver.polls_started, server.requests["read"] - 1  # minus the echo read
        assert 10 * (polls - 1) < served <= 10 * polls


def test_reads_bridge_gaps_but_never_exceed_125_registers():
    line = line_of(
        """
  s1: {plc: p, address: 0, cycle_s: 1.0, capacity: 7}
  s2: {plc: p, address: 120, cycle_s: 1.0}
  s3: {plc: p, address: 144, cycle_s: 1.0}
  s4: {plc: p, address: 1000, cycle_s: 1.0}
"""
    )
    reads = plan_reads(stations_of(line))
    assert [(r.start, r.count) for r in reads] == [(0, 120), (120, 48), (1000, 24)]
    assert [tuple(n for n, _, _ in r.stations) for r in reads] == [("s1",), ("s2", "s3"), ("s4",)]
    assert SLOT_WORDS * 7 + HEADER_WORDS == 120


async def test_a_command_whose_echo_is_out_of_contract_is_unconfirmed_not_a_crash(sim):
    """The slot shows state 99 when the echo is read: the command raises PlcTimeout (the
    caller sends it again), never the ProtocolViolation the supervisor does not expect; the
    poll tells the violation."""
    async with running(sim.line) as (driver, events):
        sim.station("s1").violate("state")
        with pytest.raises(PlcTimeout, match=r"station 's1' slot 0: command START seq 1 unconf"):
            await driver.command("s1", 0, 1, Command.START, 4)
        await events.next(lambda e: isinstance(e, StationViolation), what="the poll's violation")


async def test_a_command_cancelled_while_waiting_for_the_connection_leaves_it_free(sim):
    """A command queued behind a hanging poll is cancelled: it leaves no task behind and does
    not keep the connection's turn, so the next command goes through once the PLC answers."""
    async with running(sim.line) as (driver, _):
        server = sim.servers["p"]
        server.stall()
        sent = driver.statistics().requests
        await eventually(lambda: driver.statistics().requests > sent, what="a poll in flight")
        waiting = asyncio.create_task(driver.command("s1", 0, 1, Command.START, 1))
        await asyncio.sleep(0)  # it queues behind the poll
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        server.stall(False)  # the poll is answered (or times out and the link is rebuilt)
        await driver.wait_connected()
        status = await driver.command("s2", 0, 1, Command.START, 2)
        assert status.ack_seq == 1
