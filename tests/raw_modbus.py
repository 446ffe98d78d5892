"""A plain pymodbus client speaking the station contract, independent of linectl's driver.

The protocol-parametrised contract suite (tests/test_sim_contract.py) drives the simulators
through this and its OPC UA twin, so a bug in the driver cannot hide a bug in the simulator.
"""

from __future__ import annotations

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from linectl.config import Line, ModbusPlc
from linectl.contract import (
    H_CYCLE_COUNT,
    H_HEARTBEAT,
    SLOT_WORDS,
    SlotStatus,
    command_address,
    command_words,
    decode_slot_status,
    slot_base,
)


class RawModbusError(Exception):
    """The simulator answered with an exception response or did not answer."""


class RawModbus:
    def __init__(self, line: Line, plc: str, client: AsyncModbusTcpClient) -> None:
        self.line = line
        self.plc = plc
        self.client = client
        config = line.plcs[plc]
        assert isinstance(config, ModbusPlc)
        self.unit_id = config.unit_id

    @classmethod
    async def open(cls, line: Line, plc: str) -> RawModbus:
        config = line.plcs[plc]
        if not isinstance(config, ModbusPlc):
            raise TypeError(f"plc '{plc}' speaks {config.protocol}, not modbus")
        client = AsyncModbusTcpClient(
            config.host,
            port=config.port,
            reconnect_delay=0,
            retries=0,
            timeout=config.timeout_s,
        )
        if not await client.connect():
            client.close()
            raise RawModbusError(f"plc '{plc}' ({config.where}): cannot connect")
        return cls(line, plc, client)

    async def close(self) -> None:
        self.client.close()

    def _base(self, station: str) -> int:
        st = self.line.stations[station]
        assert st.plc == self.plc, f"station '{station}' is on plc '{st.plc}', not '{self.plc}'"
        return int(st.address)

    def _check(self, response: ModbusPDU, what: str) -> ModbusPDU:
        if response.isError():
            raise RawModbusError(f"plc '{self.plc}': {what}: {response}")
        return response

    async def read(self, address: int, count: int) -> list[int]:
        rr = await self.client.read_holding_registers(address, count=count, device_id=self.unit_id)
        return list(self._check(rr, f"read {count} at register {address}").registers)

    async def command(self, station: str, slot: int, seq: int, code: int, unit: int) -> None:
        """Write one slot's command area in one FC16 request, unvalidated (refusals are tested)."""
        address = command_address(self._base(station), slot)
        rr = await self.client.write_registers(
            address, command_words(seq, code, unit), device_id=self.unit_id
        )
        self._check(rr, f"write command at register {address}")

    async def status(self, station: str, slot: int) -> SlotStatus:
        base = self._base(station)
        start = slot_base(base, slot)
        return decode_slot_status(await self.read(start, SLOT_WORDS), start - base)

    async def heartbeat(self, station: str) -> int:
        return (await self.read(self._base(station) + H_HEARTBEAT, 1))[0]

    async def cycle_count(self, station: str) -> int:
        high, low = await self.read(self._base(station) + H_CYCLE_COUNT, 2)
        return (high << 16) | low
