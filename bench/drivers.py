"""Driver benchmark: state-change latency, request rate and controller CPU per station.

    .venv/bin/python bench/drivers.py                      # every protocol, every row
    .venv/bin/python bench/drivers.py --protocol modbus --seconds 3

The software PLCs run in a separate process, so only the drivers' CPU is counted. In there,
every station changes state on its own (fault, then reset with the next sequence number) at
exponential intervals, and stamps each change with the system-wide monotonic clock, which the
drivers' event-loop clock also reads; latency is the driver's ``SlotUpdate.at`` minus that stamp.
Stations are 10 per PLC. A protocol is one entry of ``PROTOCOLS``: how its PLCs look in a line
config and how to build its driver.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from linectl.config import Line, parse_config
from linectl.contract import Command, State
from linectl.drivers.base import DriverEvent, PlcDriver, SlotUpdate

STATIONS_PER_PLC = 10
WARMUP_S = 0.5
Key = tuple[str, int, int]  # (station, ack_seq, state code): unique per change in this bench


@dataclass(frozen=True)
class Protocol:
    plc_yaml: Callable[[int, float], str]  # (plc index, poll interval) -> the PLC's YAML mapping
    address: Callable[[int], int | str]  # station index on its PLC -> its address
    driver: Callable[..., PlcDriver]  # (name, plc config, stations, sink) -> driver
    target_p99: Callable[[float], float]  # poll interval -> p99 latency target, seconds


def _modbus_driver(*args: Any) -> PlcDriver:
    from linectl.drivers.modbus import ModbusDriver

    return ModbusDriver(*args)


PROTOCOLS: dict[str, Protocol] = {
    "modbus": Protocol(
        plc_yaml=lambda _i, poll: (
            f"{{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: {poll}}}"
        ),
        address=lambda i: i * 24,
        driver=_modbus_driver,
        target_p99=lambda poll: poll + 0.002,
    ),
}


def line_yaml(protocol: str, stations: int, poll: float) -> str:
    proto = PROTOCOLS[protocol]
    plcs = (stations + STATIONS_PER_PLC - 1) // STATIONS_PER_PLC
    lines = ["line: bench", "plcs:"]
    lines += [f"  p{i}: {proto.plc_yaml(i, poll)}" for i in range(plcs)]
    lines.append("stations:")
    for n in range(stations):
        address = proto.address(n % STATIONS_PER_PLC)
        lines.append(f"  s{n}: {{plc: p{n // STATIONS_PER_PLC}, address: {address!r}, cycle_s: 1}}")
    lines.append("flow: [s0]")
    return "\n".join(lines) + "\n"


def _quiet_pymodbus() -> None:
    # pymodbus logs a frame dump at ERROR for every response that lands after its request was
    # cancelled, which tearing down 50 connections at once produces by the dozen.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


# --- the PLC process ------------------------------------------------------------------------


def plc_process(conn: Connection, yaml_text: str, change_period_s: float) -> None:
    _quiet_pymodbus()
    asyncio.run(_plc_main(conn, parse_config(yaml_text), change_period_s))


async def _plc_main(conn: Connection, line: Line, change_period_s: float) -> None:
    from simulators.runner import SimLine

    changes: dict[Key, float] = {}
    async with SimLine(line, free_ports=True) as sim:

        def stamp(station: Any, slot: int) -> None:
            # A RESET shows Idle under the old sequence number for an instant (two updates in
            # one call, never visible to a reader): the first stamp of a key is the real one.
            s = station.status(slot)
            changes.setdefault((station.name, s.ack_seq, int(s.state)), time.monotonic())

        for plc in sim.plcs.values():
            plc.on_change(stamp)
        conn.send({name: server.endpoint_config() for name, server in sim.servers.items()})
        loop = asyncio.get_running_loop()
        stop = loop.run_in_executor(None, conn.recv)  # "stop", once the drivers are done
        async with asyncio.TaskGroup() as tg:
            toggles = [
                tg.create_task(_toggle(sim.station(name), change_period_s))
                for name in line.stations
            ]
            await stop
            for task in toggles:
                task.cancel()
    conn.send(changes)


async def _toggle(station: Any, period: float) -> None:
    """Fault the slot, then reset it with the next sequence number, at random intervals."""
    rng = random.Random(station.name)
    seq = 0
    while True:
        await asyncio.sleep(rng.expovariate(1 / period))
        if station.status(0).state == State.IDLE:
            station.fault(0)
        else:
            seq += 1
            station.command(0, seq, Command.RESET, 0)


# --- the controller side ----------------------------------------------------------------------


@dataclass
class Row:
    protocol: str
    poll: float
    stations: int
    p50_ms: float
    p99_ms: float
    samples: int
    requests_per_s: float
    cpu_us_per_station_s: float
    cpu_share: float
    kernel_share: float  # of that CPU, the share spent in the kernel (sockets, epoll)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(protocol: str, stations: int, poll: float, seconds: float) -> Row:
    proto = PROTOCOLS[protocol]
    yaml_text = line_yaml(protocol, stations, poll)
    line = parse_config(yaml_text)
    # Enough changes for a p99 even on small lines, 1 per station-second on large ones, and
    # rare enough against the poll that few are overwritten before a poll sees them.
    change_period_s = max(min(1.0, stations / 200), 5 * poll)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=plc_process, args=(there, yaml_text, change_period_s), daemon=True)
    child.start()
    loop = asyncio.get_running_loop()
    try:
        plcs = await loop.run_in_executor(None, here.recv)
        seen: dict[Key, float] = {}

        def sink(event: DriverEvent) -> None:
            if isinstance(event, SlotUpdate) and not event.resync:
                key = (event.station, event.status.ack_seq, int(event.status.state))
                seen.setdefault(key, event.at)

        drivers = [
            proto.driver(
                name,
                config,
                {n: st for n, st in line.stations.items() if st.plc == name},
                sink,
            )
            for name, config in plcs.items()
        ]
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(d.run()) for d in drivers]
            async with asyncio.timeout(10):
                for d in drivers:
                    await d.wait_connected()
            await asyncio.sleep(WARMUP_S)
            start, cpu0, os0 = time.monotonic(), time.process_time(), os.times()
            req0 = sum(d.statistics().requests for d in drivers)
            await asyncio.sleep(seconds)
            end, cpu1, os1 = time.monotonic(), time.process_time(), os.times()
            req1 = sum(d.statistics().requests for d in drivers)
            await asyncio.sleep(2 * poll + 0.05)  # let the last changes be seen
            for task in tasks:
                task.cancel()
        here.send("stop")
        changes = await loop.run_in_executor(None, here.recv)
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    measured = {key: at for key, at in changes.items() if start <= at <= end}
    latencies = [seen[key] - at for key, at in measured.items() if key in seen]
    wall = end - start
    cpu = cpu1 - cpu0
    return Row(
        protocol,
        poll,
        stations,
        p50_ms=percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        p99_ms=percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
        samples=len(latencies),
        requests_per_s=(req1 - req0) / wall,
        cpu_us_per_station_s=cpu / wall / stations * 1e6,
        cpu_share=cpu / wall,
        kernel_share=(os1.system - os0.system) / cpu if cpu else 0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), action="append")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per row")
    parser.add_argument("--stations", type=int, action="append", help="default: 10 100 500")
    parser.add_argument("--poll", type=float, action="append", help="default: 0.01 0.1")
    args = parser.parse_args()
    _quiet_pymodbus()
    print(
        f"{'protocol':8} {'poll':>6} {'stations':>8} {'p50 ms':>7} {'p99 ms':>7} {'n':>6} "
        f"{'req/s':>8} {'CPU us/stn/s':>12} {'CPU %core':>9} {'kernel':>6}  targets"
    )
    for protocol in args.protocol or sorted(PROTOCOLS):
        for poll in args.poll or [0.01, 0.1]:
            for stations in args.stations or [10, 100, 500]:
                row = asyncio.run(measure(protocol, stations, poll, args.seconds))
                target = PROTOCOLS[protocol].target_p99(poll) * 1000
                verdicts = [f"p99<={target:.0f}ms:{'ok' if row.p99_ms <= target else 'MISSED'}"]
                if stations == 500 and poll == 0.1:
                    verdicts.append(f"CPU<15%:{'ok' if row.cpu_share < 0.15 else 'MISSED'}")
                print(
                    f"{protocol:8} {poll * 1000:>4.0f}ms {stations:>8} {row.p50_ms:>7.1f} "
                    f"{row.p99_ms:>7.1f} {row.samples:>6} {row.requests_per_s:>8.0f} "
                    f"{row.cpu_us_per_station_s:>12.1f} {row.cpu_share * 100:>8.1f}% "
                    f"{row.kernel_share * 100:>5.0f}%  " + " ".join(verdicts),
                    flush=True,
                )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
