"""The bundled software PLCs honour docs/plc-interface.md, on both protocols.

These tests drive the handshake with plain pymodbus and asyncua clients (tests/raw_*.py), not
with linectl's drivers, so a bug shared by a driver and the simulator cannot hide.
"""

from __future__ import annotations

import pytest

from linectl.config import parse_config
from linectl.contract import CmdStatus, Command, Result, State
from simulators.runner import SimLine
from tests.helpers import eventually

TIME_SCALE = 0.01  # a 2 s cycle runs in 20 ms

PLCS = {
    "modbus": "{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.01}",
    "opcua": '{protocol: opcua, url: "opc.tcp://127.0.0.1:0"}',
}


def line_for(protocol: str):
    modbus = protocol == "modbus"
    addr = iter([0, 24, 64, 88, 112] if modbus else ["s1", "s2", "rej", "flt", "slow"])
    return parse_config(
        f"""
line: contract
time_scale: {TIME_SCALE}
plcs:
  p: {PLCS[protocol]}
stations:
  s1: {{plc: p, address: {next(addr)!r}, cycle_s: 2.0}}
  s2: {{plc: p, address: {next(addr)!r}, cycle_s: 2.0, capacity: 2}}
  rej: {{plc: p, address: {next(addr)!r}, cycle_s: 1.0, sim: {{reject_p: 1.0}}}}
  flt: {{plc: p, address: {next(addr)!r}, cycle_s: 1.0, sim: {{fault_p: 1.0, fault_code: 42}}}}
  slow: {{plc: p, address: {next(addr)!r}, cycle_s: 100.0}}
flow: [s1, s2, rej, flt, slow]
"""
    )


async def open_raw(protocol: str, line, plc: str):
    if protocol == "modbus":
        from tests.raw_modbus import RawModbus

        return await RawModbus.open(line, plc)
    from tests.raw_opcua import RawOpcUa

    return await RawOpcUa.open(line, plc)


@pytest.fixture(params=["modbus", "opcua"])
async def plc(request):
    async with SimLine(line_for(request.param), free_ports=True, heartbeat_period_s=0.005) as sim:
        client = await open_raw(request.param, sim.line, "p")
        try:
            yield sim, client
        finally:
            await client.close()


async def wait_state(client, station: str, slot: int, state: State, within: float = 5.0):
    async def probe():
        status = await client.status(station, slot)
        return status if status.state == state else None

    return await eventually(probe, within=within, what=f"{station} slot {slot} {state.name}")


async def test_a_station_starts_idle_with_no_command_seen(plc):
    _, client = plc
    status = await client.status("s1", 0)
    assert (status.state, status.ack_seq, status.unit, status.cmd_status) == (
        State.IDLE,
        0,
        0,
        CmdStatus.NONE,
    )


async def test_normal_cycle_runs_the_unit_and_reports_a_pass(plc):
    sim, client = plc
    before = await client.cycle_count("s1")
    await client.command("s1", 0, 1, Command.START, 7)
    done = await wait_state(client, "s1", 0, State.COMPLETE)
    assert (done.ack_seq, done.unit, done.result, done.cmd_status) == (
        1,
        7,
        Result.PASS,
        CmdStatus.ACCEPTED,
    )
    # The PLC measures the cycle in its own (config) time: about cycle_s.
    assert 1900 <= done.cycle_time_ms <= 3000
    assert await client.cycle_count("s1") == before + 1
    await client.command("s1", 0, 2, Command.RESET, 0)
    idle = await wait_state(client, "s1", 0, State.IDLE)
    assert (idle.ack_seq, idle.unit, idle.result) == (2, 0, Result.NONE)
    assert sim.station("s1").completions[7] == 1


async def test_execute_is_shown_while_the_unit_is_worked_on(plc):
    _, client = plc
    await client.command("slow", 0, 1, Command.START, 9)
    status = await wait_state(client, "slow", 0, State.EXECUTE)
    assert (status.ack_seq, status.unit, status.cmd_status) == (1, 9, CmdStatus.ACCEPTED)


async def test_a_rejected_unit_completes_with_result_reject(plc):
    _, client = plc
    await client.command("rej", 0, 1, Command.START, 3)
    done = await wait_state(client, "rej", 0, State.COMPLETE)
    assert (done.unit, done.result) == (3, Result.REJECT)


async def test_a_fault_holds_aborted_with_its_code_until_reset(plc):
    sim, client = plc
    await client.command("flt", 0, 1, Command.START, 5)
    aborted = await wait_state(client, "flt", 0, State.ABORTED)
    assert (aborted.unit, aborted.fault_code, aborted.result) == (5, 42, Result.NONE)
    # A START is refused while Aborted: the fault must be reset first.
    await client.command("flt", 0, 2, Command.START, 6)
    refused = await eventually(lambda: client.status("flt", 0), what="echo of seq 2")
    assert (refused.ack_seq, refused.cmd_status, refused.state) == (
        2,
        CmdStatus.REFUSED_STATE,
        State.ABORTED,
    )
    await client.command("flt", 0, 3, Command.RESET, 0)
    idle = await wait_state(client, "flt", 0, State.IDLE)
    assert (idle.fault_code, idle.unit) == (0, 0)
    assert sim.station("flt").aborts[5] == 1
    assert sim.station("flt").completions[5] == 0


async def test_a_repeated_sequence_number_is_not_run_again(plc):
    sim, client = plc
    await client.command("s1", 0, 1, Command.START, 11)
    await wait_state(client, "s1", 0, State.COMPLETE)
    # pymodbus re-sends a write after a timeout: the PLC must ignore the copy.
    await client.command("s1", 0, 1, Command.START, 11)
    status = await client.status("s1", 0)
    assert (status.state, status.ack_seq) == (State.COMPLETE, 1)
    await client.command("s1", 0, 2, Command.RESET, 0)
    await wait_state(client, "s1", 0, State.IDLE)
    await client.command("s1", 0, 2, Command.RESET, 0)
    await client.command("s1", 0, 1, Command.START, 11)  # an old command, seen again
    # A fresh command proves the PLC has evaluated everything written before it.
    await client.command("s1", 0, 3, Command.START, 12)
    await wait_state(client, "s1", 0, State.COMPLETE)
    station = sim.station("s1")
    assert station.starts[11] == 1
    assert station.starts[12] == 1


async def test_capacity_two_works_on_two_units_at_once(plc):
    sim, client = plc
    await client.command("s2", 0, 1, Command.START, 21)
    await client.command("s2", 1, 1, Command.START, 22)

    async def both_in_execute_or_done():
        a, b = await client.status("s2", 0), await client.status("s2", 1)
        return (
            a.unit == 21 and b.unit == 22 and {a.state, b.state} <= {State.EXECUTE, State.COMPLETE}
        )

    await eventually(both_in_execute_or_done, what="both slots busy")
    a = await wait_state(client, "s2", 0, State.COMPLETE)
    b = await wait_state(client, "s2", 1, State.COMPLETE)
    assert (a.unit, b.unit) == (21, 22)
    # The two cycles overlapped: together they took about one cycle, not two.
    station = sim.station("s2")
    assert station.completions[21] == station.completions[22] == 1


@pytest.mark.parametrize(
    ("station", "code", "unit", "verdict"),
    [
        ("s1", Command.START, 0, CmdStatus.REFUSED_UNIT),
        ("s1", 9, 1, CmdStatus.REFUSED_CODE),
        ("slow", Command.START, 2, CmdStatus.REFUSED_STATE),
        ("slow", Command.RESET, 0, CmdStatus.REFUSED_STATE),
    ],
)
async def test_a_command_the_slot_cannot_take_is_echoed_with_its_refusal(
    plc, station, code, unit, verdict
):
    _, client = plc
    if station == "slow":  # put it in Execute first
        await client.command("slow", 0, 1, Command.START, 1)
        await wait_state(client, "slow", 0, State.EXECUTE)
    seq = 5
    await client.command(station, 0, seq, code, unit)

    async def echoed():
        s = await client.status(station, 0)
        return s if s.ack_seq == seq else None

    status = await eventually(echoed, what=f"echo of seq {seq}")
    assert status.cmd_status == verdict


async def test_the_heartbeat_advances_and_can_be_frozen(plc):
    sim, client = plc
    first = await client.heartbeat("s1")
    await eventually(lambda: _changed(client, first), what="heartbeat to advance")
    sim.plcs["p"].freeze_heartbeat()
    frozen = await client.heartbeat("s1")
    # Let two cycles (about eight heartbeat periods) pass, then look again.
    await client.command("s1", 0, 1, Command.START, 1)
    await wait_state(client, "s1", 0, State.COMPLETE)
    await client.command("s1", 0, 2, Command.RESET, 0)
    await client.command("s1", 0, 3, Command.START, 2)
    await wait_state(client, "s1", 0, State.COMPLETE)
    assert await client.heartbeat("s1") == frozen


async def _changed(client, first: int) -> bool:
    return await client.heartbeat("s1") != first
