"""One behavioural suite for every driver: Modbus TCP and OPC UA (subscribed and polled) against
the bundled simulators on real sockets, and the in-process driver, all running the same station
program (simulators/station.py). What a driver owes the supervisor does not depend on the
protocol: the handshake, telling each change once, contract violations told once and cleared,
reconnects that resync, and deadlines per phase under real latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from linectl.config import Line, parse_config
from linectl.contract import CmdStatus, Command, Result, SlotStatus, State
from linectl.drivers import make_driver
from linectl.drivers.base import (
    ConnectionChange,
    DriverEvent,
    PlcDriver,
    SlotUpdate,
    StationViolation,
)
from linectl.drivers.inprocess import InProcessDriver
from linectl.errors import CommandRefused, PlcConnectionLost, PlcTimeout
from simulators.runner import SimLine
from simulators.station import SimPlc, SimStation
from tests.faultproxy import FaultProxy
from tests.helpers import eventually

TIME_SCALE = 0.01
PLCS = {
    "modbus": (
        "{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.01, timeout_s: 0.2, "
        "connect_timeout_s: 0.5, heartbeat_timeout_s: 0.3, backoff_initial_s: 0.02, "
        "backoff_max_s: 0.1}"
    ),
    "opcua": (
        '{protocol: opcua, url: "opc.tcp://127.0.0.1:0", publishing_interval_s: 0, '
        "heartbeat_timeout_s: 0.5, timeout_s: 0.5, connect_timeout_s: 0.5, "
        "backoff_initial_s: 0.05, backoff_max_s: 0.2, poll_interval_s: 0.02, mode: subscribe}"
    ),
}
PLCS["opcua-poll"] = PLCS["opcua"].replace("mode: subscribe", "mode: poll")
PLCS["inprocess"] = PLCS["modbus"]
ALL = ["modbus", "opcua", "inprocess"]
SOCKETS = ["modbus", "opcua"]
POLLED = ["modbus", "opcua-poll", "inprocess"]  # told once although read again and again


def line_of(kind: str, plc: str | None = None) -> Line:
    modbus = not kind.startswith("opcua")
    stations = [("s1", 2.0, 1), ("s2", 2.0, 1), ("s3", 2.0, 1), ("slow", 5.0, 2)]
    rows = [
        f"  {name}: {{plc: p, address: {i * 24 if modbus else repr(name)}, cycle_s: {cycle}, "
        f"capacity: {capacity}}}"
        for i, (name, cycle, capacity) in enumerate(stations)
    ]
    return parse_config(
        f"line: behaviour\nplcs:\n  p: {plc or PLCS[kind]}\nstations:\n"
        + "\n".join(rows)
        + "\nflow: [s1]\n"
    )


class Events:
    """The driver's sink: records events; ``next`` waits for the next match after the last."""

    def __init__(self) -> None:
        self.seen: list[DriverEvent] = []
        self.cursor = 0
        self._new = asyncio.Event()

    def __call__(self, event: DriverEvent) -> None:
        self.seen.append(event)
        self._new.set()

    async def next(
        self, match: Callable[[DriverEvent], bool], *, within: float = 5.0, what: str = "event"
    ) -> DriverEvent:
        try:
            async with asyncio.timeout(within):
                while True:
                    while self.cursor < len(self.seen):
                        event = self.seen[self.cursor]
                        self.cursor += 1
                        if match(event):
                            return event
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {within} s; saw {self.seen[-5:]}") from None

    async def slot(self, station: str, state: State, slot: int = 0) -> SlotUpdate:
        event = await self.next(
            lambda e: (
                isinstance(e, SlotUpdate)
                and not e.resync
                and (e.station, e.slot, e.status.state) == (station, slot, state)
            ),
            what=f"{station} slot {slot} {state.name}",
        )
        assert isinstance(event, SlotUpdate)
        return event

    async def connection(self, connected: bool, within: float = 5.0) -> ConnectionChange:
        event = await self.next(
            lambda e: isinstance(e, ConnectionChange) and e.connected is connected,
            within=within,
            what=f"ConnectionChange(connected={connected})",
        )
        assert isinstance(event, ConnectionChange)
        return event

    def updates(self, station: str, slot: int = 0) -> list[SlotStatus]:
        return [
            e.status
            for e in self.seen
            if isinstance(e, SlotUpdate) and (e.station, e.slot) == (station, slot) and not e.resync
        ]

    def violations(self) -> list[StationViolation]:
        return [e for e in self.seen if isinstance(e, StationViolation)]


@dataclass
class Rig:
    """One driver and the simulated PLC behind it."""

    kind: str
    driver: PlcDriver
    events: Events
    plc: SimPlc
    sim: SimLine | None

    def station(self, name: str) -> SimStation:
        return self.plc.stations[name]

    async def reads(self, n: int) -> None:
        """Wait until the driver has read the PLC ``n`` more times (or, subscribed, a while)."""
        if self.kind == "inprocess":
            await asyncio.sleep(0.05)
            return
        server = self.sim.servers["p"]  # type: ignore[union-attr]
        if self.kind == "opcua":  # a subscription: wait for n heartbeats to be published
            start = self.plc.heartbeat
            await eventually(lambda: self.plc.heartbeat >= start + n, what=f"{n} heartbeats")
            return
        start = server.requests["read"]
        await eventually(lambda: server.requests["read"] >= start + n, what=f"{n} reads")


def _driver(kind: str, line: Line, events: Events) -> PlcDriver:
    stations = dict(line.stations)
    if kind == "inprocess":
        return InProcessDriver("p", line.plcs["p"], stations, events, time_scale=TIME_SCALE)
    return make_driver("p", line.plcs["p"], stations, events)


@contextlib.asynccontextmanager
async def rigged(
    kind: str, line: Line | None = None, *, simulate: bool = True
) -> AsyncIterator[Rig]:
    line = line or line_of(kind)
    async with contextlib.AsyncExitStack() as stack:
        sim = None
        if kind != "inprocess" and simulate:
            # A fast heartbeat for quick loss detection; OPC UA publishes each beat, so slower.
            beat = 0.01 if kind == "modbus" else 0.05
            sim = await stack.enter_async_context(
                SimLine(line, free_ports=True, time_scale=TIME_SCALE, heartbeat_period_s=beat)
            )
            line = sim.line
        events = Events()
        driver = _driver(kind, line, events)
        if isinstance(driver, InProcessDriver):
            plc = driver.plc
        else:
            plc = sim.plcs["p"] if sim is not None else SimPlc("p", {})
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(driver.run(), name=f"driver-{kind}")
            try:
                yield Rig(kind, driver, events, plc, sim)
            finally:
                task.cancel()


async def _connected(kind: str) -> AsyncIterator[Rig]:
    async with rigged(kind) as rig:
        await rig.events.connection(True)
        yield rig


@pytest.fixture(params=[*ALL[:2], "opcua-poll", *ALL[2:]])
async def handshake_rig(request) -> AsyncIterator[Rig]:
    async for rig in _connected(request.param):
        yield rig


@pytest.fixture(params=ALL)
async def rig(request) -> AsyncIterator[Rig]:
    async for rig in _connected(request.param):
        yield rig


@pytest.fixture(params=SOCKETS)
async def socket_rig(request) -> AsyncIterator[Rig]:
    async for rig in _connected(request.param):
        yield rig


@pytest.fixture(params=POLLED)
async def polled_rig(request) -> AsyncIterator[Rig]:
    async for rig in _connected(request.param):
        yield rig


# --- the handshake -----------------------------------------------------------------------


async def test_connect_resyncs_every_slot_before_announcing_the_connection(rig: Rig):
    first = next(i for i, e in enumerate(rig.events.seen) if isinstance(e, ConnectionChange))
    resynced = [(e.station, e.slot, e.resync) for e in rig.events.seen[:first]]  # type: ignore[union-attr]
    assert sorted(resynced) == [
        ("s1", 0, True),
        ("s2", 0, True),
        ("s3", 0, True),
        ("slow", 0, True),
        ("slow", 1, True),
    ]


async def test_a_unit_runs_the_whole_handshake_each_change_told_once(handshake_rig: Rig):
    rig = handshake_rig
    driver, events = rig.driver, rig.events
    started = await driver.command("slow", 1, 1, Command.START, 41)
    assert (started.ack_seq, started.cmd_status) == (1, CmdStatus.ACCEPTED)
    done = await events.slot("slow", State.COMPLETE, slot=1)
    assert (done.status.unit, done.status.result, done.status.ack_seq) == (41, Result.PASS, 1)
    # The PLC's own measure of its cycle, in its (config) time: 5 s, and late only by however
    # late this loaded machine ran the simulator's timer.
    assert 5000 <= done.status.cycle_time_ms < 10_000
    await driver.command("slow", 1, 2, Command.RESET, 0)
    idle = await events.slot("slow", State.IDLE, slot=1)
    assert (idle.status.ack_seq, idle.status.unit) == (2, 0)
    await rig.reads(3)
    assert [s.state for s in events.updates("slow", 1)] == [
        State.EXECUTE,
        State.COMPLETE,
        State.IDLE,
    ]
    assert rig.station("slow").slot_starts[1] == {41: 1}
    stats = driver.statistics()
    assert stats.connected and stats.errors == 0 and stats.reconnects == 0
    assert stats.requests >= 2 and stats.since_connected_s is not None


async def test_a_refused_command_raises_naming_the_verdict(rig: Rig):
    await rig.driver.command("slow", 0, 1, Command.START, 5)
    with pytest.raises(CommandRefused, match=r"station 'slow' slot 0: .*seq 2 .*REFUSED_STATE"):
        await rig.driver.command("slow", 0, 2, Command.START, 6)
    with pytest.raises(CommandRefused, match="REFUSED_UNIT"):
        await rig.driver.command("s1", 0, 1, Command.START, 0)


async def test_a_repeated_sequence_number_is_confirmed_but_not_run_again(rig: Rig):
    first = await rig.driver.command("s1", 0, 1, Command.START, 7)
    await rig.events.slot("s1", State.COMPLETE)
    again = await rig.driver.command("s1", 0, 1, Command.START, 7)
    assert again.ack_seq == first.ack_seq == 1
    assert rig.station("s1").starts[7] == 1
    assert rig.station("s1").commands_repeated == 1


async def test_a_fault_is_told_with_its_code_and_cleared_by_reset(rig: Rig):
    await rig.driver.command("s2", 0, 1, Command.START, 12)
    await rig.events.slot("s2", State.EXECUTE)
    rig.station("s2").fault(0, 7)
    aborted = await rig.events.slot("s2", State.ABORTED)
    assert (aborted.status.unit, aborted.status.fault_code) == (12, 7)
    await rig.driver.command("s2", 0, 2, Command.RESET, 0)
    idle = await rig.events.slot("s2", State.IDLE)
    assert (idle.status.unit, idle.status.fault_code) == (0, 0)


async def test_a_plc_in_stop_evaluates_nothing_and_the_command_runs_once_after(rig: Rig):
    """A PLC that cannot evaluate a command (program in STOP) runs nothing: the driver says it
    got no echo (OPC UA: the call's BadInvalidState), the caller sends the same sequence number
    again, and once the PLC runs the unit starts exactly once."""
    rig.plc.run_program(False)
    kinds = (PlcTimeout,) if rig.kind != "modbus" else (PlcTimeout, PlcConnectionLost)
    with pytest.raises(kinds) as refused:
        await rig.driver.command("s1", 0, 1, Command.START, 8)
    if rig.kind == "opcua":
        assert "the PLC did not evaluate command START seq 1: BadInvalidState" in str(refused.value)
    assert rig.station("s1").starts[8] == 0
    rig.plc.run_program(True)
    await rig.driver.wait_connected()
    for _ in range(50):  # as the supervisor would: the same number until it is echoed
        try:
            status = await rig.driver.command("s1", 0, 1, Command.START, 8)
            break
        except (PlcTimeout, PlcConnectionLost):
            await rig.driver.wait_connected()
    assert (status.ack_seq, status.cmd_status) == (1, CmdStatus.ACCEPTED)
    await rig.events.slot("s1", State.COMPLETE)
    assert rig.station("s1").slot_starts[0] == {8: 1}


# --- contract violations -----------------------------------------------------------------


async def test_out_of_contract_values_are_told_while_other_stations_keep_going(rig: Rig):
    await rig.driver.command("s3", 0, 1, Command.START, 30)
    await rig.events.slot("s3", State.COMPLETE)
    rig.station("s1").violate("state")
    rig.station("s2").violate("unit")
    rig.station("s3").violate("seq")
    told: dict[str, str] = {}
    while len(told) < 3:  # in whatever order the driver finds them
        event = await rig.events.next(lambda e: isinstance(e, StationViolation), what="violation")
        assert isinstance(event, StationViolation) and event.slot == 0
        told[event.station] = str(event.error)
    assert "unknown state code 99" in told["s1"]
    assert "neither there at connect nor commanded" in told["s2"]
    assert "echoed sequence number went back from 1 to 0" in told["s3"]
    assert all(message.startswith(f"{rig.driver.where} station '") for message in told.values())
    await rig.driver.command("slow", 0, 1, Command.START, 9)
    await rig.events.slot("slow", State.COMPLETE)
    assert rig.driver.connected
    assert len(rig.events.violations()) == 3


async def test_a_violation_is_told_once_and_cleared_when_the_slot_is_back_as_before(
    polled_rig: Rig,
):
    """Issue 13 defect 8: a slot that shows a bad value and then exactly its previous good
    status is told again (the supervisor un-faults it); read again and again, the bad value is
    told once."""
    rig = polled_rig
    station = rig.station("s1")
    before = station.status(0)
    station.violate("state")
    await rig.events.next(lambda e: isinstance(e, StationViolation), what="the violation")
    await rig.reads(10)
    assert len(rig.events.violations()) == 1
    station.show(0, before)
    back = await rig.events.next(
        lambda e: isinstance(e, SlotUpdate) and e.station == "s1", what="s1 told again"
    )
    assert isinstance(back, SlotUpdate) and back.status == before and not back.resync
    # And it runs again.
    await rig.driver.command("s1", 0, 1, Command.START, 3)
    await rig.events.slot("s1", State.COMPLETE)


async def test_a_subscribed_violation_is_cleared_when_the_slot_is_back_as_before():
    async with rigged("opcua") as rig:
        await rig.events.connection(True)
        station = rig.station("s1")
        before = station.status(0)
        station.violate("state")
        await rig.events.next(lambda e: isinstance(e, StationViolation), what="the violation")
        station.show(0, before)
        back = await rig.events.next(
            lambda e: isinstance(e, SlotUpdate) and e.station == "s1", what="s1 told again"
        )
        assert isinstance(back, SlotUpdate) and back.status == before
        assert len(rig.events.violations()) == 1


# --- connections -------------------------------------------------------------------------


async def test_a_command_while_disconnected_fails_at_once(rig: Rig):
    if rig.sim is None:
        rig.driver.set_reachable(False)  # type: ignore[attr-defined]
    else:
        await rig.sim.servers["p"].stop()
    lost = await rig.events.connection(False)
    assert rig.driver.where in lost.reason
    async with asyncio.timeout(0.1):
        with pytest.raises(PlcConnectionLost, match=r"station 's1'.*not connected"):
            await rig.driver.command("s1", 0, 1, Command.START, 1)


async def test_dropped_connections_are_reestablished_and_resynced(socket_rig: Rig):
    rig = socket_rig
    rig.sim.servers["p"].drop_connections()  # type: ignore[union-attr]
    await rig.events.connection(False)
    rig.station("s2").command(0, 9, Command.START, 77)  # a change nobody watched
    mark = len(rig.events.seen)
    await rig.events.connection(True)
    resync = [e for e in rig.events.seen[mark:] if isinstance(e, SlotUpdate)]
    assert len(resync) >= 5 and all(e.resync for e in resync[:5])
    assert any(e.station == "s2" and e.status.unit == 77 for e in resync[:5])
    assert rig.driver.statistics().reconnects == 1
    await rig.driver.command("s1", 0, 1, Command.START, 5)
    await rig.events.slot("s1", State.COMPLETE)


async def test_a_restarted_plc_is_reconnected_and_resynced(socket_rig: Rig):
    rig = socket_rig
    assert rig.sim is not None
    old = rig.sim.servers["p"]
    config = rig.sim.line.plcs["p"]
    await old.stop()
    lost = await rig.events.connection(False)
    assert rig.driver.where in lost.reason
    rig.station("slow").command(1, 4, Command.START, 21)  # changes while nobody is connected
    mark = len(rig.events.seen)
    port = config.port if rig.kind == "modbus" else int(config.url.rsplit(":", 1)[1])  # type: ignore[union-attr]
    server_class = type(old)
    restarted = server_class("p", config, rig.plc, port=port)
    await restarted.start()
    rig.sim.servers["p"] = restarted  # SimLine stops it
    await rig.events.connection(True)
    resync = [e for e in rig.events.seen[mark:] if isinstance(e, SlotUpdate)]
    assert len(resync) == 5 and all(e.resync for e in resync)
    assert any((e.station, e.slot, e.status.unit) == ("slow", 1, 21) for e in resync)
    assert rig.driver.statistics().reconnects == 1
    assert (await rig.driver.command("s1", 0, 1, Command.START, 5)).ack_seq == 1


async def test_a_frozen_heartbeat_counts_as_a_lost_connection(socket_rig: Rig):
    rig = socket_rig
    config = rig.driver.config
    loop = asyncio.get_running_loop()
    rig.plc.freeze_heartbeat()
    frozen_at = loop.time()
    lost = await rig.events.connection(False)
    assert "heartbeat frozen" in lost.reason
    # Within the heartbeat timeout, plus a heartbeat period, a poll and scheduling slack.
    assert lost.at - frozen_at <= config.heartbeat_timeout_s + 0.2
    rig.plc.freeze_heartbeat(False)
    await rig.events.connection(True)


@pytest.mark.parametrize("kind", SOCKETS)
async def test_a_refused_connection_is_told_once_and_hangs_nothing(kind: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    plc = PLCS[kind].replace("port: 0", f"port: {port}").replace(":0", f":{port}")
    async with rigged(kind, line_of(kind, plc), simulate=False) as rig:
        lost = await rig.events.connection(False)
        assert f"127.0.0.1:{port}" in lost.reason
        errors = rig.driver.statistics().errors
        await eventually(
            lambda: rig.driver.statistics().errors >= errors + 2, what="two more connect attempts"
        )
        async with asyncio.timeout(0.1):
            with pytest.raises(PlcConnectionLost):
                await rig.driver.command("s1", 0, 1, Command.START, 1)
        assert not rig.driver.connected
        assert len(rig.events.seen) == 1  # one outage, told once


@pytest.mark.parametrize("kind", ALL)
async def test_cancelling_the_driver_stops_it_cleanly(kind: str):
    async with rigged(kind) as rig:
        await rig.events.connection(True)
        await rig.driver.command("slow", 0, 1, Command.START, 1)
    assert not rig.driver.connected  # and no task left (the autouse leak check)


# --- real latency --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def over_latency(kind: str, rtt: float, deadline: float) -> AsyncIterator[Rig]:
    """A driver talking to its simulated PLC through a proxy adding ``rtt`` of round trip."""
    async with SimLine(line_of(kind), free_ports=True, time_scale=TIME_SCALE) as sim:
        real = sim.line.plcs["p"]
        port = real.port if kind == "modbus" else int(real.url.rsplit(":", 1)[1])  # type: ignore[union-attr]
        async with FaultProxy(("127.0.0.1", port)) as proxy:
            proxy.latency_s = rtt / 2  # each way: a steady round trip of rtt
            update = {"timeout_s": deadline, "heartbeat_timeout_s": 3.0, "connect_timeout_s": 3.0}
            if kind == "modbus":
                update |= {"port": proxy.port, "poll_interval_s": 0.02}
            else:
                update |= {"url": f"opc.tcp://127.0.0.1:{proxy.port}"}
            line = sim.line.model_copy(update={"plcs": {"p": real.model_copy(update=update)}})
            events = Events()
            driver = make_driver("p", line.plcs["p"], dict(line.stations), events)
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(driver.run())
                try:
                    await events.connection(True, within=10)
                    yield Rig(kind, driver, events, sim.plcs["p"], sim)
                finally:
                    task.cancel()


async def send(driver: PlcDriver, station: str, slot: int, seq: int, code: Command, unit: int):
    """As the supervisor does: the same number again after a timeout; how many it took."""
    for timeouts in range(10):
        try:
            await driver.command(station, slot, seq, code, unit)
            return timeouts
        except PlcTimeout:
            continue
    raise AssertionError(f"{station} slot {slot} seq {seq}: ten timeouts in a row")


@pytest.mark.parametrize("kind", SOCKETS)
async def test_a_steady_round_trip_of_a_third_of_the_deadline_costs_no_resend(kind: str):
    """Issue 13 defect 9: waiting behind a poll, the write and the echo each have their own
    deadline, so commands over a 0.1 s round trip with a 0.35 s deadline never time out (one
    deadline for all three phases ran out for most commands)."""
    async with over_latency(kind, rtt=0.1, deadline=0.35) as rig:
        seq = 0
        for unit in range(1, 4):
            for code, unit_id in ((Command.START, unit), (Command.RESET, 0)):
                seq += 1
                assert await send(rig.driver, "s1", 0, seq, code, unit_id) == 0, (code, seq)
                if code == Command.START:
                    await rig.events.slot("s1", State.COMPLETE)
        assert rig.driver.statistics().errors == 0
        assert rig.station("s1").commands_repeated == 0


@pytest.mark.parametrize("kind", SOCKETS)
async def test_commands_queued_behind_each_other_on_a_slow_link_do_not_time_out(kind: str):
    """Five STARTs at once over a 0.1 s round trip: on Modbus they queue for the one
    connection for longer than the 0.35 s deadline, but the queue moves, so none times out."""
    async with over_latency(kind, rtt=0.1, deadline=0.35) as rig:
        slots = [("s1", 0), ("s2", 0), ("s3", 0), ("slow", 0), ("slow", 1)]
        async with asyncio.TaskGroup() as tg:
            sent = [
                tg.create_task(send(rig.driver, name, slot, 1, Command.START, 10 + i))
                for i, (name, slot) in enumerate(slots)
            ]
        assert [t.result() for t in sent] == [0] * len(slots)
        assert rig.driver.statistics().errors == 0
        assert sum(rig.station(name).commands_repeated for name, _ in slots[:4]) == 0
