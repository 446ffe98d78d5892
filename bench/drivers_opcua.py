"""OPC UA driver figures: state-change latency, notifications/s and controller CPU per station.

The simulated PLC runs in a separate process (so its CPU is not the controller's); the
controller process runs one OpcUaDriver and a small loop that keeps every station cycling
(Complete -> Reset, Idle -> Start the next unit). Latency is from the moment the simulated
station changed a value (the Status DataValue's SourceTimestamp, wall clock, same machine) to
the moment the driver decoded the notification. Publishing interval 0: notify at once.

    .venv/bin/python bench/drivers_opcua.py [--stations 10,100,500] [--seconds 5]

The rows belong in bench/drivers.py (the Modbus bench) once both exist side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from asyncua import ua

from linectl.config import Line, parse_config
from linectl.contract import Command, State
from linectl.drivers.base import DriverEvent, SlotUpdate
from linectl.drivers.opcua import OpcUaDriver, SlotKey


def line_config(stations: int, port: int) -> Line:
    rows = "\n".join(f"  s{i}: {{plc: cell, address: s{i}, cycle_s: 1.0}}" for i in range(stations))
    return parse_config(
        f"""
line: bench_opcua
plcs:
  cell:
    protocol: opcua
    url: "opc.tcp://127.0.0.1:{port}"
    publishing_interval_s: 0
    timeout_s: 5
    connect_timeout_s: 10
stations:
{rows}
flow: [{", ".join(f"s{i}" for i in range(stations))}]
"""
    )


async def serve(stations: int, port: int) -> None:
    """The simulator process: serve until stdin closes."""
    from simulators.runner import SimLine

    async with SimLine(line_config(stations, port)):
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


class TimedDriver(OpcUaDriver):
    """Records, per notification, how long after the PLC's change the driver decoded it."""

    latencies: list[float]

    def _observe_value(
        self,
        key: SlotKey,
        node: ua.NodeId,
        value: ua.DataValue | None,
        at: float,
        *,
        resync: bool = False,
    ) -> None:
        if not resync and value is not None and value.SourceTimestamp is not None:
            self.latencies.append((datetime.now(UTC) - value.SourceTimestamp).total_seconds())
        super()._observe_value(key, node, value, at, resync=resync)


@dataclass
class Result:
    stations: int
    seconds: float
    notifications: int
    cycles: int
    cpu_s: float
    p50_ms: float
    p99_ms: float


async def measure(stations: int, seconds: float) -> Result:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sim = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(stations),
        "--port",
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert sim.stdout is not None and sim.stdin is not None
        async with asyncio.timeout(60):
            ready = await sim.stdout.readline()
        assert ready.strip() == b"ready", f"simulator did not start: {ready!r}"
        return await _drive(line_config(stations, port), seconds)
    finally:
        if sim.stdin is not None:
            sim.stdin.close()
        try:
            async with asyncio.timeout(10):
                await sim.wait()
        except TimeoutError:
            sim.kill()
            await sim.wait()


async def _drive(line: Line, seconds: float) -> Result:
    todo: asyncio.Queue[SlotUpdate] = asyncio.Queue(maxsize=4 * len(line.stations) + 16)
    cycles = 0

    def sink(event: DriverEvent) -> None:
        if isinstance(event, SlotUpdate) and event.status.state in (State.IDLE, State.COMPLETE):
            todo.put_nowait(event)

    driver = TimedDriver("cell", line.plcs["cell"], line.stations, sink)
    driver.latencies = []
    seqs: dict[str, int] = {}
    units = iter(range(1, 1 << 31))

    async def worker() -> None:
        nonlocal cycles
        while True:
            event = await todo.get()
            await driver.wait_connected()  # resync updates come just before the connect event
            seq = seqs.get(event.station, event.status.ack_seq) + 1
            seqs[event.station] = seq
            if event.status.state == State.COMPLETE:
                await driver.command(event.station, 0, seq, Command.RESET, 0)
                cycles += 1
            else:
                await driver.command(event.station, 0, seq, Command.START, next(units))

    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(driver.run())
        workers = [tg.create_task(worker()) for _ in range(32)]
        await driver.wait_connected()
        await asyncio.sleep(2.0)  # warm up: every station cycling
        driver.latencies.clear()
        n0, c0, cpu0, t0 = (
            driver.statistics().notifications,
            cycles,
            time.process_time(),
            time.monotonic(),
        )
        await asyncio.sleep(seconds)
        n1, c1, cpu1, t1 = (
            driver.statistics().notifications,
            cycles,
            time.process_time(),
            time.monotonic(),
        )
        lat = sorted(driver.latencies)
        for task in [runner, *workers]:
            task.cancel()
    return Result(
        stations=len(line.stations),
        seconds=t1 - t0,
        notifications=n1 - n0,
        cycles=c1 - c0,
        cpu_s=cpu1 - cpu0,
        p50_ms=statistics.median(lat) * 1000 if lat else float("nan"),
        p99_ms=lat[int(0.99 * (len(lat) - 1))] * 1000 if lat else float("nan"),
    )


async def main(sizes: list[int], seconds: float) -> None:
    print("OPC UA subscription, publishing interval 0, 1 s cycles, simulator in its own process")
    print(
        f"{'stations':>8} {'notif/s':>9} {'cycles/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU ms/station/s':>17}"
    )
    for n in sizes:
        r = await measure(n, seconds)
        print(
            f"{r.stations:>8} {r.notifications / r.seconds:>9.0f} {r.cycles / r.seconds:>9.1f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.cpu_s / r.seconds / r.stations * 1000:>17.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", default="10,100,500")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port))
    else:
        asyncio.run(main([int(n) for n in args.stations.split(",")], args.seconds))
