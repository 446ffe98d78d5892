"""A plain asyncua client on the station contract, independent of linectl's driver.

The shared contract suite (tests/test_sim_contract.py) drives the simulators through this and
its Modbus twin, so that a bug in the driver cannot hide a bug in the simulator.
"""

from __future__ import annotations

from asyncua import Client, ua

from linectl.config import Line, OpcUaPlc
from linectl.contract import (
    OPCUA_COMMAND,
    OPCUA_CYCLE_COUNT,
    OPCUA_HEARTBEAT,
    OPCUA_NAMESPACE,
    OPCUA_ROOT,
    OPCUA_STATUS,
    SlotStatus,
    slot_name,
    status_from_array,
)


class RawOpcUa:
    """One session to one simulated PLC, reading and calling nodes by their contract names."""

    def __init__(self, line: Line, plc: str, client: Client, ns: int) -> None:
        self.line = line
        self.plc = plc
        self.client = client
        self.ns = ns

    @classmethod
    async def open(cls, line: Line, plc: str) -> RawOpcUa:
        config = line.plcs[plc]
        assert isinstance(config, OpcUaPlc), f"plc '{plc}' is not an OPC UA PLC"
        client = Client(config.url, timeout=config.timeout_s)
        await client.connect()
        try:
            ns = await client.get_namespace_index(OPCUA_NAMESPACE)
        except BaseException:
            await client.disconnect()
            raise
        return cls(line, plc, client, ns)

    async def close(self) -> None:
        await self.client.disconnect()

    def _node(self, *path: str) -> ua.NodeId:
        return ua.NodeId(".".join((OPCUA_ROOT, *path)), self.ns)

    def _address(self, station: str) -> str:
        return str(self.line.stations[station].address)

    async def command(self, station: str, slot: int, seq: int, code: int, unit: int) -> None:
        base = (self._address(station), slot_name(slot))
        obj = self.client.get_node(self._node(*base))
        await obj.call_method(
            self._node(*base, OPCUA_COMMAND),
            ua.Variant(seq, ua.VariantType.UInt32),
            ua.Variant(int(code), ua.VariantType.UInt16),
            ua.Variant(unit, ua.VariantType.UInt32),
        )

    async def status(self, station: str, slot: int) -> SlotStatus:
        node = self._node(self._address(station), slot_name(slot), OPCUA_STATUS)
        return status_from_array(await self.client.get_node(node).read_value())

    async def heartbeat(self, station: str) -> int:
        """The heartbeat of the PLC that runs ``station`` (one per PLC in OPC UA)."""
        return await self.client.get_node(self._node(OPCUA_HEARTBEAT)).read_value()

    async def cycle_count(self, station: str) -> int:
        node = self._node(self._address(station), OPCUA_CYCLE_COUNT)
        return await self.client.get_node(node).read_value()
