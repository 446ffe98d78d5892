"""What only the OPC UA driver does, against the simulated PLC on real sockets: violations name
the node, poll mode reads instead of subscribing. What every driver does is
tests/test_driver_behaviour.py."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from linectl.config import Line, parse_config
from linectl.contract import Command, State
from linectl.drivers.base import ConnectionChange, DriverEvent, SlotUpdate, StationViolation
from linectl.drivers.opcua import OpcUaDriver
from simulators.runner import SimLine
from tests.helpers import eventually

CONFIG = """
line: opcua_driver
plcs:
  cell_b:
    protocol: opcua
    url: "opc.tcp://127.0.0.1:14840"
    publishing_interval_s: 0
    heartbeat_timeout_s: 0.5
    timeout_s: 0.5
    connect_timeout_s: 0.5
    backoff_initial_s: 0.05
    backoff_max_s: 0.2
    mode: {mode}
    poll_interval_s: 0.02
stations:
  b1: {{plc: cell_b, address: b1, cycle_s: 1, capacity: 2}}
  b2: {{plc: cell_b, address: b2, cycle_s: 1}}
flow: [b1, b2]
time_scale: 0.02
"""


def config(mode: str = "subscribe") -> Line:
    return parse_config(CONFIG.format(mode=mode))


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before - {asyncio.current_task()} if not t.done()]
    assert not leaked, f"tasks left running: {leaked}"


class Recorder:
    """Collects driver events and lets a test wait for one that matches."""

    def __init__(self) -> None:
        self.events: list[DriverEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: DriverEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(
        self, match: Callable[[DriverEvent], bool], within: float = 3.0, after: int = 0
    ) -> DriverEvent:
        async with asyncio.timeout(within):
            while True:
                for event in self.events[after:]:
                    if match(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    def connected_count(self) -> int:
        return sum(isinstance(e, ConnectionChange) and e.connected for e in self.events)


@asynccontextmanager
async def running(line: Line) -> AsyncIterator[tuple[OpcUaDriver, Recorder]]:
    recorder = Recorder()
    stations = {n: s for n, s in line.stations.items() if s.plc == "cell_b"}
    driver = OpcUaDriver("cell_b", line.plcs["cell_b"], stations, recorder)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(driver.run())
        try:
            yield driver, recorder
        finally:
            task.cancel()


def update(station: str, slot: int, state: State, **fields: int) -> Callable[[DriverEvent], bool]:
    def match(e: DriverEvent) -> bool:
        return (
            isinstance(e, SlotUpdate)
            and (e.station, e.slot, e.status.state) == (station, slot, state)
            and all(getattr(e.status, k) == v for k, v in fields.items())
        )

    return match


def is_lost(e: DriverEvent) -> bool:
    return isinstance(e, ConnectionChange) and not e.connected


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("state", r"node ns=\d+;s=LinectlStations\.b1\.Slot1\.Status: unknown state code 99"),
        ("unit", r"b1.*unit \d+ was neither there at connect nor commanded"),
        ("seq", r"b1.*echoed sequence number went back from 4 to 3"),
    ],
)
async def test_out_of_contract_values_are_violations(kind: str, message: str) -> None:
    async with SimLine(config(), free_ports=True) as sim, running(sim.line) as (driver, rec):
        await driver.wait_connected()
        await driver.command("b1", 0, 4, Command.START, 8)
        await rec.wait_for(update("b1", 0, State.COMPLETE, unit=8))
        sim.station("b1").violate(kind)
        violation = await rec.wait_for(lambda e: isinstance(e, StationViolation))
        assert (violation.station, violation.slot) == ("b1", 0)  # type: ignore[union-attr]
        assert violation.error.station == "b1"  # type: ignore[union-attr]
        assert "plc 'cell_b' (opc.tcp://127.0.0.1:" in str(violation.error)  # type: ignore[union-attr]
        assert re.search(message, str(violation.error)), violation
        # The driver keeps running: another station still reports its changes.
        await driver.command("b2", 0, 1, Command.START, 9)
        await rec.wait_for(update("b2", 0, State.COMPLETE, unit=9))
        assert driver.connected


async def test_poll_mode_reports_changes_and_heartbeat() -> None:
    async with SimLine(config("poll"), free_ports=True) as sim, running(sim.line) as (driver, rec):
        await driver.wait_connected()
        await driver.command("b2", 0, 1, Command.START, 5)
        await rec.wait_for(update("b2", 0, State.COMPLETE, unit=5))
        assert sim.servers["cell_b"].requests["read"] >= 3
        assert driver.statistics().notifications == 0
        sim.plcs["cell_b"].freeze_heartbeat()
        await rec.wait_for(is_lost)


async def test_two_publish_requests_wait_at_the_plc() -> None:
    """A change that comes while one PublishRequest's answer is on its way goes out at once,
    in the answer to the other one, instead of a round trip later."""
    from linectl.drivers.opcua import PUBLISH_REQUESTS

    async with SimLine(config(), free_ports=True) as sim, running(sim.line) as (driver, rec):
        await driver.wait_connected()
        server = next(iter(sim.servers.values()))._server
        queued = lambda: [len(c.processor._publish_requests) for c in server.bserver.clients]  # noqa: E731
        await eventually(lambda: PUBLISH_REQUESTS in queued(), what=f"requests queued: {queued()}")
        # Answers come back through either request, in order.
        for seq, unit in ((1, 8), (3, 9)):
            await driver.command("b2", 0, seq, Command.START, unit)
            await rec.wait_for(update("b2", 0, State.COMPLETE, unit=unit))
            await driver.command("b2", 0, seq + 1, Command.RESET, 0)
            await rec.wait_for(update("b2", 0, State.IDLE, ack_seq=seq + 1))
