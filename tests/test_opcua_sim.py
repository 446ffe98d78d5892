"""The simulated PLC's OPC UA face: the address space the contract promises, read-only status,
fault injection and a clean stop. Behaviour shared with Modbus lives in test_sim_contract.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState

from linectl.config import Line, parse_config
from linectl.contract import (
    CONTRACT_VERSION,
    OPCUA_NAMESPACE,
    OPCUA_ROOT,
    STATUS_FIELDS,
    Command,
    State,
)
from simulators.runner import SimLine
from tests.helpers import eventually
from tests.raw_opcua import RawOpcUa

CONFIG = """
line: opcua_sim
plcs:
  cell_b: {protocol: opcua, url: "opc.tcp://127.0.0.1:14840/plc"}
stations:
  b1: {plc: cell_b, address: b1, cycle_s: 1, capacity: 2}
  b2: {plc: cell_b, address: Press-2, cycle_s: 1}
flow: [b1, b2]
time_scale: 0.02
"""


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before - {asyncio.current_task()} if not t.done()]
    assert not leaked, f"tasks left running: {leaked}"


@pytest.fixture
async def sim() -> AsyncIterator[SimLine]:
    async with SimLine(parse_config(CONFIG), free_ports=True) as sim:
        yield sim


@pytest.fixture
async def client(sim: SimLine) -> AsyncIterator[Client]:
    client = Client(sim.line.plcs["cell_b"].url, timeout=2)
    await client.connect()
    yield client
    await client.disconnect()


async def test_address_space_is_the_contract(sim: SimLine, client: Client) -> None:
    """Namespace, browse names, data types and values are those of linectl/contract.py."""
    ns = await client.get_namespace_index(OPCUA_NAMESPACE)
    root = await client.nodes.objects.get_child(f"{ns}:{OPCUA_ROOT}")
    heartbeat = await root.get_child(f"{ns}:Heartbeat")
    assert await heartbeat.read_data_type_as_variant_type() == ua.VariantType.UInt32

    press = await root.get_child(f"{ns}:Press-2")
    assert (await press.get_child(f"{ns}:SlotCount")).nodeid.Identifier == (
        f"{OPCUA_ROOT}.Press-2.SlotCount"
    )
    b1 = await root.get_child(f"{ns}:b1")
    children = {(await c.read_browse_name()).Name for c in await b1.get_children()}
    assert children == {"CycleCount", "SlotCount", "ContractVersion", "Slot1", "Slot2"}
    for name, kind, value in [
        ("CycleCount", ua.VariantType.UInt32, 0),
        ("SlotCount", ua.VariantType.UInt16, 2),
        ("ContractVersion", ua.VariantType.UInt16, CONTRACT_VERSION),
    ]:
        node = await b1.get_child(f"{ns}:{name}")
        assert await node.read_data_type_as_variant_type() == kind, name
        assert await node.read_value() == value, name

    status = await b1.get_child([f"{ns}:Slot2", f"{ns}:Status"])
    assert await status.read_data_type_as_variant_type() == ua.VariantType.UInt32
    assert await status.read_value_rank() == 1
    assert await status.read_array_dimensions() == [len(STATUS_FIELDS)]
    assert await status.read_value() == [0, int(State.IDLE), 0, 0, 0, 0, 0]

    command = await b1.get_child([f"{ns}:Slot2", f"{ns}:Command"])
    assert await command.read_node_class() == ua.NodeClass.Method
    inputs = await (await command.get_child("0:InputArguments")).read_value()
    outputs = await (await command.get_child("0:OutputArguments")).read_value()
    assert [(a.Name, a.DataType.Identifier) for a in inputs] == [
        ("Seq", ua.ObjectIds.UInt32),
        ("Code", ua.ObjectIds.UInt16),
        ("Unit", ua.ObjectIds.UInt32),
    ]
    assert [(a.Name, a.DataType.Identifier) for a in outputs] == [
        ("AckSeq", ua.ObjectIds.UInt32),
        ("CmdStatus", ua.ObjectIds.UInt16),
    ]


async def test_command_method_returns_the_echo_and_status_follows(sim: SimLine) -> None:
    raw = await RawOpcUa.open(sim.line, "cell_b")
    try:
        slot = raw._node("b1", "Slot2")
        out = await raw.client.get_node(slot).call_method(
            raw._node("b1", "Slot2", "Command"),
            ua.Variant(7, ua.VariantType.UInt32),
            ua.Variant(int(Command.START), ua.VariantType.UInt16),
            ua.Variant(42, ua.VariantType.UInt32),
        )
        assert out == [7, 1]
        status = await raw.status("b1", 1)  # read right after the call: already updated
        assert (status.ack_seq, status.state, status.unit) == (7, State.EXECUTE, 42)
        assert sim.servers["cell_b"].requests["call"] == 1
        assert sim.servers["cell_b"].requests["read"] >= 1
    finally:
        await raw.close()


@pytest.mark.parametrize("name", ["b1.Slot1.Status", "Heartbeat", "b1.CycleCount"])
async def test_plc_owned_nodes_are_read_only(sim: SimLine, client: Client, name: str) -> None:
    ns = await client.get_namespace_index(OPCUA_NAMESPACE)
    node = client.get_node(ua.NodeId(f"{OPCUA_ROOT}.{name}", ns))
    value = await node.read_data_value()
    with pytest.raises(ua.UaStatusCodeError) as err:
        await node.write_value(value.Value)
    assert err.value.code in (ua.StatusCodes.BadUserAccessDenied, ua.StatusCodes.BadNotWritable)


async def test_subscriber_sees_whole_status_arrays(sim: SimLine, client: Client) -> None:
    """Every notification is one complete, decodable array (the PLC writes it atomically)."""
    ns = await client.get_namespace_index(OPCUA_NAMESPACE)
    sub = await client.create_subscription(0, None)
    try:
        await sub.subscribe_data_change(
            client.get_node(ua.NodeId(f"{OPCUA_ROOT}.b1.Slot1.Status", ns))
        )
        seen: list[list[int]] = []
        sim.station("b1").command(0, 1, Command.START, 5)
        async with asyncio.timeout(3):
            while not seen or seen[-1][1] != State.COMPLETE:
                event = await sub.next_event(timeout=3)
                seen.append(event.value)  # type: ignore[union-attr]
        assert all(len(v) == len(STATUS_FIELDS) for v in seen)
        assert seen[-1][3] == 5 and seen[-1][0] == 1
    finally:
        await sub.delete()


async def test_drop_connections_cuts_clients_and_keeps_listening(
    sim: SimLine, client: Client
) -> None:
    server = sim.servers["cell_b"]
    server.drop_connections()
    await eventually(
        lambda: client.uaclient.state is UaClientState.DISCONNECTED, what="client disconnected"
    )
    await eventually(lambda: not server._server.iserver._external_sessions, what="sessions closed")
    raw = await RawOpcUa.open(sim.line, "cell_b")
    try:
        assert (await raw.status("b2", 0)).state == State.IDLE
    finally:
        await raw.close()


async def test_stop_frees_the_port_and_its_tasks() -> None:
    before = asyncio.all_tasks()
    sim = SimLine(parse_config(CONFIG), free_ports=True)
    await sim.__aenter__()
    line: Line = sim.line
    raw = await RawOpcUa.open(line, "cell_b")
    await raw.client.create_subscription(50, None)  # a session the server must close itself
    port = int(line.plcs["cell_b"].url.split(":")[2].split("/")[0])
    await sim.stop()
    await raw.close()
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() - before if not t.done()]
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


async def test_port_none_uses_the_configured_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = parse_config(CONFIG.replace("14840", str(port)))
    async with SimLine(line) as sim:
        assert sim.line.plcs["cell_b"].url == f"opc.tcp://127.0.0.1:{port}/plc"
        raw = await RawOpcUa.open(sim.line, "cell_b")
        assert await raw.cycle_count("b1") == 0
        await raw.close()
