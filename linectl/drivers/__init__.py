"""PLC drivers. ``make_driver`` picks the one for a PLC's protocol; nothing else names them."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from linectl.config import ModbusPlc, OpcUaPlc, Station
from linectl.drivers.base import EventSink, PlcDriver


def make_driver(
    name: str, config: ModbusPlc | OpcUaPlc, stations: Mapping[str, Station], sink: EventSink
) -> PlcDriver:
    if isinstance(config, ModbusPlc):
        from linectl.drivers.modbus import ModbusDriver

        return ModbusDriver(name, config, stations, sink)
    from linectl.drivers.opcua import OpcUaDriver

    return OpcUaDriver(name, config, stations, sink)


def preload(configs: Iterable[ModbusPlc | OpcUaPlc]) -> None:
    """Import the driver modules ``configs`` need now rather than at the first connect: a
    standby taking over a line must not spend its first seconds importing asyncua."""
    for protocol in {config.protocol for config in configs}:
        importlib.import_module(f"linectl.drivers.{protocol}")
