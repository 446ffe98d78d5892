"""Start every PLC of a line config as a software PLC, in-process.

    async with SimLine(cfg, free_ports=True) as sim:
        cfg = sim.line          # the same config, with the ports the servers really bound
        sim.station("a1").fault()

Tests, the demo and ``linectl compare`` use this; ``linectl sim`` wraps it in a process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

from linectl.config import Line, ModbusPlc, OpcUaPlc
from simulators.station import SimPlc, SimStation


def _server_for(name: str, config: ModbusPlc | OpcUaPlc, plc: SimPlc, port: int | None) -> Any:
    if isinstance(config, ModbusPlc):
        from simulators.modbus_server import ModbusSimServer

        return ModbusSimServer(name, config, plc, port=port)
    from simulators.opcua_server import OpcUaSimServer

    return OpcUaSimServer(name, config, plc, port=port)


class SimLine:
    """All the simulated PLCs of one line, started together and stopped together."""

    def __init__(
        self,
        line: Line,
        *,
        free_ports: bool = False,
        time_scale: float | None = None,
        heartbeat_period_s: float = 0.1,
    ) -> None:
        self.config = line
        self.time_scale = line.time_scale if time_scale is None else time_scale
        self.plcs: dict[str, SimPlc] = {}
        for plc_name in line.plcs:
            stations = {n: st for n, st in line.stations.items() if st.plc == plc_name}
            self.plcs[plc_name] = SimPlc(plc_name, stations, self.time_scale, heartbeat_period_s)
        self.servers = {
            name: _server_for(name, line.plcs[name], plc, 0 if free_ports else None)
            for name, plc in self.plcs.items()
        }
        self._tasks: list[asyncio.Task[None]] = []
        self.line = line

    async def __aenter__(self) -> SimLine:
        try:
            for server in self.servers.values():
                await server.start()
        except BaseException:
            await self._stop_servers()
            raise
        for plc in self.plcs.values():
            self._tasks.append(asyncio.create_task(plc.run_heartbeat(), name=f"hb-{plc.name}"))
        plcs = {name: server.endpoint_config() for name, server in self.servers.items()}
        self.line = self.config.model_copy(update={"plcs": plcs})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for plc in self.plcs.values():
            plc.stop()
        await self._stop_servers()

    async def _stop_servers(self) -> None:
        for server in self.servers.values():
            await server.stop()

    def station(self, name: str) -> SimStation:
        plc = self.config.stations[name].plc
        return self.plcs[plc].stations[name]

    def completions(self) -> dict[str, Counter[int]]:
        """Per station, how many cycles each unit completed there."""
        return {
            name: st.completions for plc in self.plcs.values() for name, st in plc.stations.items()
        }
