"""The Modbus simulator's own behaviour: register layout, refused writes, connections, ports.

The handshake itself is pinned by the protocol-parametrised tests/test_sim_contract.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes

from linectl.config import parse_config
from linectl.contract import (
    COMMAND_WORDS,
    CONTRACT_VERSION,
    H_HEARTBEAT,
    H_SLOTS,
    H_VERSION,
    S_ACK_SEQ,
    S_STATE,
    CmdStatus,
    Command,
    State,
    block_words,
    command_address,
    command_words,
    slot_base,
)
from linectl.errors import ConfigError
from simulators.modbus_server import ModbusSimServer
from simulators.runner import SimLine
from simulators.station import SimPlc
from tests.helpers import eventually
from tests.raw_modbus import RawModbus

LINE = """
line: modbus_sim
time_scale: 0.01
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 0, unit_id: 3, timeout_s: 0.5}
stations:
  a: {plc: p, address: 100, cycle_s: 100.0, capacity: 2}
  b: {plc: p, address: 150, cycle_s: 100.0}
flow: [a, b]
"""
A, B = 100, 150  # gap of 150 - (100 + 40) = 10 registers between the blocks


@pytest.fixture
async def sim():
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.005) as sim:
        yield sim


@pytest.fixture
async def raw(sim):
    client = await RawModbus.open(sim.line, "p")
    try:
        yield client
    finally:
        await client.close()


async def write(raw: RawModbus, address: int, values: list[int]):
    return await raw.client.write_registers(address, values, device_id=raw.unit_id)


async def test_a_station_block_is_its_header_then_its_slots(sim, raw):
    words = await raw.read(A, block_words(2))
    assert words[H_VERSION] == CONTRACT_VERSION
    assert words[H_SLOTS] == 2
    assert words == sim.station("a").words()


async def test_a_command_write_lands_in_its_slot_and_is_echoed(sim, raw):
    await raw.command("a", 1, 5, Command.START, 77)
    words = await raw.read(slot_base(A, 1), 16)
    assert words[:COMMAND_WORDS] == command_words(5, Command.START, 77)
    assert words[S_ACK_SEQ : S_ACK_SEQ + 2] == [0, 5]
    assert words[S_STATE] == State.EXECUTE
    assert sim.station("a").status(0).state == State.IDLE  # the other slot is untouched
    assert sim.station("a").starts[77] == 1


@pytest.mark.parametrize(
    ("what", "address", "values"),
    [
        ("status registers", slot_base(A, 0) + S_ACK_SEQ, [0, 9]),
        ("a partial command area", command_address(A, 0), [0, 1, 1, 0, 0]),
        ("a command area and more", command_address(A, 0), [0, 1, 1, 0, 0, 7, 0]),
        ("a command area shifted by one", command_address(A, 0) + 1, [0, 1, 1, 0, 0, 7]),
        ("the header", A, [1, 1, 0, 0, 0, 0]),
        ("a gap", A + block_words(2), [0, 1, 1, 0, 0, 7]),
    ],
)
async def test_a_write_outside_one_whole_command_area_is_refused(sim, raw, what, address, values):
    response = await write(raw, address, values)
    assert response.isError(), what
    assert response.exception_code == ExcCodes.ILLEGAL_ADDRESS
    assert sim.station("a").commands_evaluated == 0


async def test_a_single_register_write_is_refused(sim, raw):
    response = await raw.client.write_register(command_address(A, 0), 1, device_id=raw.unit_id)
    assert response.isError()
    assert response.exception_code == ExcCodes.ILLEGAL_FUNCTION  # the PLC serves FC3, FC16
    assert sim.station("a").commands_evaluated == 0


def _frame(fc: int, body: bytes) -> bytes:
    return bytes([fc]) + body


def _u16(*values: int) -> bytes:
    return struct.pack(f">{len(values)}H", *values)


_COMMAND = _u16(0, 1, Command.RESET, 0, 0, 0)
# Each row of docs/plc-interface.md "What the PLC answers": (unit id, request PDUs, answer),
# the answer None for a normal response, else the exception code.
ANSWERS: dict[str, tuple[int | None, list[bytes], int | None]] = {
    "FC3 of 1 … 125 registers within the span": (
        None,
        [_frame(3, _u16(A, 1)), _frame(3, _u16(A, B + block_words(1) - A))],
        None,
    ),
    "FC16 of exactly 6 registers at a slot's command area": (
        None,
        [_frame(16, _u16(command_address(A, 1), 6) + bytes([12]) + _COMMAND)],
        None,
    ),
    "FC3 of 0 or more than 125 registers": (
        None,
        [_frame(3, _u16(A, 0)), _frame(3, _u16(A, 126))],
        ExcCodes.ILLEGAL_VALUE,
    ),
    "FC16 of 0 or more than 123 registers": (
        None,
        [_frame(16, _u16(A, 0) + bytes([0])), _frame(16, _u16(A, 124) + bytes([248]) + bytes(248))],
        ExcCodes.ILLEGAL_VALUE,
    ),
    "FC3 reaching outside the span": (None, [_frame(3, _u16(A - 1, 2))], ExcCodes.ILLEGAL_ADDRESS),
    "FC16 anywhere else, or of another length": (
        None,
        [
            _frame(16, _u16(A, 6) + bytes([12]) + _COMMAND),
            _frame(16, _u16(command_address(A, 0), 5) + bytes([10]) + _COMMAND[:10]),
        ],
        ExcCodes.ILLEGAL_ADDRESS,
    ),
    "any other function code (FC1, 2, 4, 5, 6, 8, 15, 22, 23, 43, ...)": (
        None,
        [
            _frame(1, _u16(A, 8)),
            _frame(2, _u16(A, 8)),
            _frame(4, _u16(A, 8)),
            _frame(5, _u16(A, 0xFF00)),
            _frame(6, _u16(command_address(A, 0), 1)),
            _frame(8, _u16(0, 0x1234)),
            _frame(15, _u16(A, 8) + bytes([1, 1])),
            _frame(22, _u16(A, 0xFFFF, 0)),
            _frame(23, _u16(A, 2, command_address(A, 0), 6) + bytes([12]) + _COMMAND),
            bytes([43, 14, 1, 0]),
            bytes([0x41, 0, 0]),
        ],
        ExcCodes.ILLEGAL_FUNCTION,
    ),
    "a unit id other than the PLC's `unit_id`": (
        7,
        [
            _frame(3, _u16(A, 1)),
            _frame(16, _u16(command_address(A, 1), 6) + bytes([12]) + _COMMAND),
        ],
        ExcCodes.GATEWAY_NO_RESPONSE,
    ),
}


def test_every_row_of_the_documented_answers_is_sent():
    from tests.test_plc_interface_doc import table_rows

    assert [row[0] for row in table_rows("### What the PLC answers")] == list(ANSWERS)


async def _ask(port: int, unit: int, pdu: bytes) -> bytes:
    """One request as raw Modbus TCP (MBAP header, then the PDU); the PDU of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack(">HHHB", 1, 0, len(pdu) + 1, unit) + pdu)
        async with asyncio.timeout(2):
            length = struct.unpack(">HHHB", await reader.readexactly(7))[2]
            return await reader.readexactly(length - 1)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("row", list(ANSWERS))
async def test_the_simulator_answers_as_the_contract_says(sim, row):
    unit, requests, answer = ANSWERS[row]
    port = sim.line.plcs["p"].port
    for pdu in requests:
        got = await _ask(port, 3 if unit is None else unit, pdu)
        if answer is None:
            assert got[0] == pdu[0], (row, pdu.hex(), got.hex())
        else:
            assert got == bytes([pdu[0] | 0x80, answer]), (row, pdu.hex(), got.hex())
    assert sim.station("a").commands_evaluated == (1 if answer is None and "FC16" in row else 0)


async def test_one_read_spans_several_blocks_and_the_gap_between_reads_zero(sim, raw):
    def steady(block: list[int]) -> list[int]:
        # The heartbeat ticks every 5 ms here: it may move between the read and the look.
        return block[:H_HEARTBEAT] + block[H_HEARTBEAT + 1 :]

    end = B + block_words(1)
    words = await raw.read(A, end - A)
    assert steady(words[: block_words(2)]) == steady(sim.station("a").words())
    assert words[block_words(2) : B - A] == [0] * (B - A - block_words(2))
    assert steady(words[B - A :]) == steady(sim.station("b").words())


@pytest.mark.parametrize(("address", "count"), [(A - 1, 2), (B, block_words(1) + 1), (0, 1)])
async def test_a_read_outside_the_stations_span_is_refused(raw, address, count):
    response = await raw.client.read_holding_registers(address, count=count, device_id=3)
    assert response.isError()
    assert response.exception_code == ExcCodes.ILLEGAL_ADDRESS


async def test_requests_are_counted_by_kind(sim, raw):
    server = sim.servers["p"]
    before = server.requests.copy()
    await raw.read(A, 4)
    await raw.read(B, 4)
    await raw.command("b", 0, 1, Command.RESET, 0)
    await write(raw, A, [0])
    counted = server.requests - before
    assert counted == {"read": 2, "write": 2}


async def test_dropped_connections_close_but_the_server_keeps_listening(sim, raw):
    server = sim.servers["p"]
    assert server.client_count == 1
    server.drop_connections()
    await eventually(lambda: not raw.client.connected, within=2, what="client to see the drop")
    assert server.client_count == 0
    again = await RawModbus.open(sim.line, "p")
    try:
        assert (await again.status("b", 0)).cmd_status == CmdStatus.NONE
        assert server.connections_accepted == 2
    finally:
        await again.close()


async def test_a_stalled_server_keeps_the_connection_but_answers_nothing(sim, raw):
    server = sim.servers["p"]
    server.stall()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await raw.read(A, 1)
    assert raw.client.connected
    server.stall(False)
    fresh = await RawModbus.open(sim.line, "p")
    try:
        assert (await fresh.read(A + H_SLOTS, 1)) == [2]
    finally:
        await fresh.close()


async def test_stop_frees_the_port_and_a_new_server_can_take_it():
    line = parse_config(LINE)
    plc = SimPlc("p", {n: st for n, st in line.stations.items()})
    first = ModbusSimServer("p", line.plcs["p"], plc, port=0)
    await first.start()
    port = first.port
    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0, retries=0)
    assert await client.connect()
    await first.stop()
    await eventually(lambda: not client.connected, within=2, what="client to see the stop")
    client.close()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # raises if anything still holds the port
    second = ModbusSimServer("p", line.plcs["p"], plc, port=port)
    await second.start()
    try:
        assert second.endpoint_config().port == port
    finally:
        await second.stop()


async def test_a_taken_port_is_reported_with_the_plc_and_address(sim):
    taken = sim.servers["p"].port
    line = parse_config(LINE)
    other = ModbusSimServer("q", line.plcs["p"], SimPlc("q", dict(line.stations)), port=taken)
    with pytest.raises(OSError, match=rf"plc 'q': cannot listen on 127\.0\.0\.1:{taken}"):
        await other.start()


def test_a_non_loopback_host_is_refused():
    line = parse_config(LINE.replace("host: 127.0.0.1", "host: 10.1.2.3"))
    with pytest.raises(ConfigError, match=r"10\.1\.2\.3' is not one"):
        ModbusSimServer("p", line.plcs["p"], SimPlc("p", dict(line.stations)))
