"""The OPC UA driver against the simulated PLC on real sockets: handshake, echo, reconnects,
heartbeat watchdog, contract violations, poll mode and failing fast when disconnected."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from linectl.config import Line, parse_config
from linectl.contract import Command, State
from linectl.drivers.base import ConnectionChange, DriverEvent, SlotUpdate, StationViolation
from linectl.drivers.opcua import OpcUaDriver
from linectl.errors import CommandRefused, PlcConnectionLost
from simulators.opcua_server import OpcUaSimServer
from simulators.runner import SimLine

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


def is_connected(e: DriverEvent) -> bool:
    return isinstance(e, ConnectionChange) and e.connected


def is_lost(e: DriverEvent) -> bool:
    return isinstance(e, ConnectionChange) and not e.connected


async def test_handshake_resync_then_command_confirmed_by_echo() -> None:
    async with SimLine(config(), free_ports=True) as sim, running(sim.line) as (driver, rec):
        await driver.wait_connected()
        first = rec.events[
            : rec.events.index(next(e for e in rec.events if isinstance(e, ConnectionChange)))
        ]
        assert [(e.station, e.slot, e.resync) for e in first] == [  # type: ignore[union-attr]
            ("b1", 0, True),
            ("b1", 1, True),
            ("b2", 0, True),
        ]
        status = await driver.command("b1", 1, 1, Command.START, 42)
        assert (status.ack_seq, status.cmd_status.name) == (1, "ACCEPTED")
        await rec.wait_for(update("b1", 1, State.EXECUTE, unit=42, ack_seq=1))
        await rec.wait_for(update("b1", 1, State.COMPLETE, unit=42))
        # The same seq again is answered with the same echo and not run again.
        again = await driver.command("b1", 1, 1, Command.START, 42)
        assert again.ack_seq == 1 and sim.station("b1").starts[42] == 1
        with pytest.raises(CommandRefused, match=r"b1.*REFUSED_STATE"):
            await driver.command("b1", 1, 2, Command.START, 43)  # Complete: must reset first
        stats = driver.statistics()
        assert stats.connected and stats.notifications > 0 and stats.requests >= 4
        assert stats.reconnects == 0 and stats.errors == 0


async def test_restarted_simulator_is_reconnected_and_resynced() -> None:
    async with SimLine(config(), free_ports=True) as sim, running(sim.line) as (driver, rec):
        await driver.wait_connected()
        server = sim.servers["cell_b"]
        port = int(server.url.rsplit(":", 1)[1])
        await server.stop()
        await rec.wait_for(is_lost)
        with pytest.raises(PlcConnectionLost):  # fails fast while the PLC is away
            async with asyncio.timeout(0.2):
                await driver.command("b1", 0, 1, Command.START, 5)
        sim.station("b2").command(0, 9, Command.START, 77)  # changes while disconnected
        mark = len(rec.events)
        restarted = OpcUaSimServer("cell_b", sim.line.plcs["cell_b"], sim.plcs["cell_b"], port=port)
        await restarted.start()
        try:
            await rec.wait_for(update("b2", 0, State.COMPLETE, unit=77), after=mark)
            resync = [e for e in rec.events[mark:] if isinstance(e, SlotUpdate)][:3]
            assert all(e.resync for e in resync)
            await rec.wait_for(is_connected, after=mark)
            assert (await driver.command("b1", 0, 1, Command.START, 5)).ack_seq == 1
            assert driver.statistics().reconnects == 1
        finally:
            await restarted.stop()


async def test_frozen_heartbeat_is_a_lost_connection() -> None:
    async with SimLine(config(), free_ports=True) as sim, running(sim.line) as (driver, rec):
        await driver.wait_connected()
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        sim.plcs["cell_b"].freeze_heartbeat()
        lost = await rec.wait_for(is_lost)
        assert "heartbeat unchanged" in lost.reason  # type: ignore[union-attr]
        # Detected within heartbeat_timeout_s (0.5 s) plus the last beat's period (0.1 s).
        assert lost.at - frozen_at < 0.5 + 0.1 + 0.1
        mark = len(rec.events)
        sim.plcs["cell_b"].freeze_heartbeat(False)
        await rec.wait_for(is_connected, after=mark)


async def test_dropped_connections_are_rebuilt() -> None:
    async with SimLine(config(), free_ports=True) as sim, running(sim.line) as (driver, rec):
        await driver.wait_connected()
        mark = len(rec.events)
        sim.servers["cell_b"].drop_connections()
        await rec.wait_for(is_lost, after=mark)
        await rec.wait_for(is_connected, after=mark)
        await driver.command("b1", 0, 3, Command.START, 11)
        await rec.wait_for(update("b1", 0, State.EXECUTE, unit=11))


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


async def test_unreachable_url_fails_fast_and_cancels_cleanly() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = parse_config(CONFIG.format(mode="subscribe").replace("14840", str(port)))
    async with running(line) as (driver, rec):
        lost = await rec.wait_for(lambda e: isinstance(e, ConnectionChange), within=2)
        assert not lost.connected and f"127.0.0.1:{port}" in lost.reason  # type: ignore[union-attr]
        with pytest.raises(PlcConnectionLost, match=r"b1.*not connected"):
            async with asyncio.timeout(0.1):
                await driver.command("b1", 0, 1, Command.START, 1)
        assert driver.statistics().errors >= 1
