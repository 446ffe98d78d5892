"""Run a supervisor against the bundled simulators, with the invariants checked at every event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from linectl.config import Line, parse_config
from linectl.supervisor import Supervisor
from simulators.runner import SimLine

# A three-station sequence with no sim: sections, so every cycle is exactly its cycle_s; b is
# the bottleneck (2 s: 200 ms of wall time at time scale 0.1, long against a handover). Virtual
# runs set the time scale to 1.
SMALL = """\
line: small
time_scale: 0.1
plcs:
  p0: {protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.005}
stations:
  a: {plc: p0, address: 0, cycle_s: 1}
  b: {plc: p0, address: 40, cycle_s: 2}
  c: {plc: p0, address: 80, cycle_s: 0.5}
flow: [a, b, c]
"""


@dataclass
class Running:
    sim: SimLine
    sup: Supervisor
    task: asyncio.Task[None]

    async def wait_finished(self, n: int, within: float = 20.0) -> None:
        from tests.helpers import eventually

        await eventually(
            lambda: self.sup.finished + len(self.sup.quarantined) >= n or self.task.done(),
            within=within,
            what=f"{n} units finished or quarantined",
        )
        if self.task.done():
            self.task.result()  # surface a crash of the supervisor


@contextlib.asynccontextmanager
async def running_line(line: Line | str, **supervisor_args) -> AsyncIterator[Running]:
    if isinstance(line, str):
        line = parse_config(line)
    async with SimLine(line, free_ports=True, heartbeat_period_s=0.05) as sim:
        sup = Supervisor(sim.line, **supervisor_args)
        sup.on_event = sup.check_invariants
        task = asyncio.create_task(sup.run(), name="supervisor")
        try:
            yield Running(sim, sup, task)
        finally:
            sup.stop()
            async with asyncio.timeout(15):
                await task


async def run_to_completion(line: Line | str, *, within: float = 30.0, **supervisor_args):
    """Run until ``release.count`` units are finished or quarantined; return sim and supervisor."""
    if isinstance(line, str):
        line = parse_config(line)
    async with SimLine(line, free_ports=True, heartbeat_period_s=0.05) as sim:
        sup = Supervisor(sim.line, exit_when_done=True, **supervisor_args)
        sup.on_event = sup.check_invariants
        async with asyncio.timeout(within):
            await sup.run()
        return sim, sup


def steady_interval(finish_times: tuple[float, ...], skip: int) -> float:
    """Mean time between finished units after the first ``skip`` (the line filling up)."""
    times = finish_times[skip:]
    return (times[-1] - times[0]) / (len(times) - 1)


@dataclass
class Virtual:
    sup: Supervisor
    stats: Any  # the supervisor's statistics() at the end (its clock needs the loop)
    drivers: dict[str, Any]  # by PLC name; .executions() counts cycles started per unit

    def starts(self, station: str) -> int:
        """Cycles started at ``station`` (all its slots, all units)."""
        return sum(
            sum(counts.values())
            for d in self.drivers.values()
            for (name, _slot), counts in d.executions().items()
            if name == station
        )


def run_virtual(line: Line | str, **supervisor_args) -> Virtual:
    """``run_to_completion`` in virtual time against in-process PLCs: the engine's own figures,
    exact and in milliseconds of CPU."""
    from linectl import virtual
    from linectl.drivers.inprocess import InProcessDriver

    if isinstance(line, str):
        line = parse_config(line)
    drivers: dict[str, InProcessDriver] = {}

    def factory(name, config, stations, sink):
        drivers[name] = InProcessDriver(name, config, stations, sink, time_scale=line.time_scale)
        return drivers[name]

    async def main() -> Virtual:
        sup = Supervisor(line, driver_factory=factory, exit_when_done=True, **supervisor_args)
        sup.on_event = sup.check_invariants
        async with asyncio.timeout(100_000):  # virtual seconds: a flow that cannot finish
            await sup.run()
        return Virtual(sup, sup.statistics(), drivers)

    return virtual.run(main())
