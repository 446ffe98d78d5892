"""Northbound benchmark (issue 15): how fast the plant sees the line, what it costs, and that
it does not slow the line.

    .venv/bin/python bench/northbound.py [--quick]

Needs Mosquitto on 127.0.0.1:1883. Rows:

- **PLC → MQTT / OPC UA p99**: the handover line of bench/supervisor.py (Modbus, polled every
  10 ms) runs in this process with northbound on (unified namespace, Sparkplug B, OPC UA
  server). A second process runs the simulated PLCs; a third, the plant: an MQTT subscriber
  and an OPC UA client subscribed to every station's StateName and UnitSerial (publishing
  interval 50 ms), apart from the PLCs so their work never slows a simulated PLC. From a
  simulated station showing Execute with a unit (stamped in the PLC) to the subscriber seeing
  that station Execute with that unit's serial, on the system-wide monotonic clock. The PLC
  leg includes the poll (up to 10 ms), like every PLC → anything latency.
- **handover p99 with / without northbound**: the supervisor's own seen→START figure on that
  line, without a northbound section, with it and nobody subscribed (what northbound costs
  this process), and with it and the plant's subscribers attached (their process and the
  broker then share the machine's cores with the PLC simulators).
- **500 stations at 1 Hz**: a 500-station plant's supervisor (not run: no PLCs) whose event
  hub gets every station's change once a second, with northbound on (UNS, Sparkplug, OPC UA
  server with 500 stations, then each part alone); this process's CPU (all its threads) while
  it publishes, minus the same feed with no northbound. The broker's own CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import time
import uuid
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from supervisor import _recv, handover_line, quiet, wide_plant

from linectl import aio
from linectl.compare import percentile
from linectl.config import Line
from linectl.events import StationChanged
from linectl.journal import Journal
from linectl.northbound import Northbound
from linectl.supervisor import Supervisor

BROKER = ("127.0.0.1", 1883)


PARTS = ("uns", "sparkplug", "opcua")


def with_northbound(line: Line, prefix: str, group: str, parts: tuple[str, ...] = PARTS) -> Line:
    data = line.model_dump(mode="json", exclude_none=True)
    mqtt: dict[str, Any] = {
        "host": BROKER[0],
        "port": BROKER[1],
        "spool": {"dir": f"/tmp/linectl-bench-spool-{uuid.uuid4().hex[:8]}"},
    }
    if "uns" in parts:
        mqtt["uns"] = {"topic_prefix": prefix, "qos": 1}
    if "sparkplug" in parts:
        mqtt["sparkplug"] = {"group_id": group}
    data["northbound"] = {"mqtt": mqtt} if "uns" in parts or "sparkplug" in parts else {}
    if "opcua" in parts:
        data["northbound"]["opcua"] = {"port": 0, "allow_anonymous": True}
    return Line.model_validate(data)


# --- the other processes: simulated PLCs, and the plant's subscribers -------------------------


def plc_process(conn: Connection, line: Line) -> None:
    quiet()
    asyncio.run(_plc_main(conn, line))


async def _plc_main(conn: Connection, line: Line) -> None:
    from simulators.runner import SimLine

    plc_at: dict[tuple[str, int], float] = {}  # (station, unit id) -> Execute at the PLC
    async with SimLine(line, free_ports=True) as sim:

        def stamp(station: Any, slot: int) -> None:
            s = station.status(slot)
            if s.unit and s.state.name == "EXECUTE":
                plc_at.setdefault((station.name, s.unit), time.monotonic())

        for plc in sim.plcs.values():
            plc.on_change(stamp)
        conn.send({name: server.endpoint_config() for name, server in sim.servers.items()})
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
    conn.send(plc_at)


def subscriber_process(conn: Connection, line: Line, where: dict[str, str]) -> None:
    """The plant's MQTT subscriber and OPC UA client, in a process of their own so that their
    work never slows the simulated PLCs (the handover figures compare runs with and without)."""
    quiet()
    asyncio.run(_subscriber_main(conn, line, where))


async def _subscriber_main(conn: Connection, line: Line, where: dict[str, str]) -> None:
    import aiomqtt
    from asyncua import Client

    mqtt_at: dict[tuple[str, str], float] = {}  # (station, serial) -> seen by MQTT
    opcua_at: dict[tuple[str, str], float] = {}
    serials: dict[str, int] = {}
    base = f"{where['prefix']}/{line.line}"

    class Handler:
        def __init__(self) -> None:
            self.state: dict[str, str] = {}
            self.unit: dict[str, str] = {}

        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            now = time.monotonic()
            _, _, station, what = node.nodeid.Identifier.split(".")
            (self.state if what == "StateName" else self.unit)[station] = val
            if self.state.get(station) == "Execute" and self.unit.get(station):
                for serial in self.unit[station].split(","):
                    opcua_at.setdefault((station, serial), now)

    async with (
        aiomqtt.Client(*BROKER) as mqtt,
        Client(where["url"], timeout=10) as ua_client,
    ):
        await mqtt.subscribe(f"{base}/#", qos=1)
        ns = await ua_client.get_namespace_index("urn:linectl:northbound")
        nodes = [
            ua_client.get_node(f"ns={ns};s=Line.Stations.{name}.{what}")
            for name in line.stations
            for what in ("StateName", "UnitSerial")
        ]
        sub = await ua_client.create_subscription(50, Handler())
        await sub.subscribe_data_change(nodes)

        async def read_mqtt() -> None:
            async for m in mqtt.messages:
                now = time.monotonic()
                topic = str(m.topic)
                data = json.loads(m.payload) if m.payload else {}
                if topic == f"{base}/units/released":
                    serials[data["serial"]] = data["unit_id"]
                elif topic.endswith("/state") and data.get("state_name") == "Execute":
                    station = topic.split("/")[-2]
                    for serial in data["units"]:
                        mqtt_at.setdefault((station, serial), now)

        reader = asyncio.create_task(read_mqtt())
        conn.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        reader.cancel()
        await sub.delete()
    conn.send((mqtt_at, opcua_at, serials))


def latencies(
    plc_at: dict[tuple[str, int], float],
    seen: dict[tuple[str, str], float],
    serials: dict[str, int],
) -> list[float]:
    out = []
    for (station, serial), at in seen.items():
        unit = serials.get(serial)
        start = plc_at.get((station, unit)) if unit is not None else None
        if start is not None:
            out.append(at - start)
    return out


# --- this process: the controller ------------------------------------------------------------


async def _controller(line: Line, northbound: bool, plant: bool = True) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=plc_process, args=(there, line), daemon=True)
    child.start()
    children, watcher = [child], None
    prefix, group = f"bench/{uuid.uuid4().hex[:8]}/area", f"bench{uuid.uuid4().hex[:6]}"
    try:
        plcs = await _recv(here, 60, "endpoints")
        run_line = line.model_copy(update={"plcs": plcs})
        if northbound:
            run_line = with_northbound(run_line, prefix, group)
        sup = Supervisor(run_line, journal=Journal(), exit_when_done=True)
        sup.pause(True)  # until the subscribers listen
        nb = Northbound(sup, run_line)
        await nb.start()
        try:
            task = asyncio.create_task(sup.run(), name="supervisor")
            if northbound:
                async with asyncio.timeout(60):
                    await nb.opcua.started.wait()
            if northbound and plant:
                watcher, theirs = ctx.Pipe()
                where = {"url": nb.opcua.url, "prefix": prefix}
                sub = ctx.Process(
                    target=subscriber_process, args=(theirs, run_line, where), daemon=True
                )
                sub.start()
                children.append(sub)
                await _recv(watcher, 60, "subscribers ready")
            sup.pause(False)
            async with asyncio.timeout(300):
                await task
            if northbound:  # let the last messages arrive
                for _ in range(200):  # at most 10 s
                    if not any(s.queued for s in nb.statistics().links):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
        finally:
            await nb.stop()
        here.send("stop")
        plc_at = await _recv(here, 60, "stamps")
        seen = None
        if watcher is not None:
            watcher.send("stop")
            seen = await _recv(watcher, 60, "subscriber stamps")
    finally:
        for c in children:
            c.join(timeout=10)
            if c.is_alive():
                c.kill()
                c.join()
    stats = sup.statistics()
    out: dict[str, Any] = {"handovers": list(stats.handovers)}
    if seen is not None:
        mqtt_at, opcua_at, serials = seen
        out["mqtt"] = latencies(plc_at, mqtt_at, serials)
        out["opcua"] = latencies(plc_at, opcua_at, serials)
        out["dropped"] = [s.memory_dropped + s.events_dropped for s in nb.statistics().links]
    return out


def ms(values: list[float], p: float) -> str:
    return f"{percentile(values, p / 100) * 1000:.1f}" if values else "n/a"


def latency_rows(units: int) -> None:
    line = handover_line("modbus")
    line = line.model_copy(update={"release": line.release.model_copy(update={"count": units})})
    without = aio.run(_controller(line, northbound=False))
    alone = aio.run(_controller(line, northbound=True, plant=False))
    with_nb = aio.run(_controller(line, northbound=True))
    print(f"handover line (Modbus, 10 ms poll), {units} units, 8 stations")
    for name in ("mqtt", "opcua"):
        v = with_nb[name]
        print(
            f"  PLC Execute -> {name:5} subscriber: n={len(v)}  p50 {ms(v, 50)} ms  "
            f"p99 {ms(v, 99)} ms  max {ms(v, 100)} ms"
        )
    for label, run in (
        ("without northbound                     ", without),
        ("with northbound, nobody subscribed     ", alone),
        ("with northbound and the plant listening", with_nb),
    ):
        h = run["handovers"]
        print(f"  handover seen->START {label}: n={len(h)}  p50 {ms(h, 50)} ms  p99 {ms(h, 99)} ms")
    print(f"  messages or events dropped by northbound: {with_nb['dropped']}")


# --- 500 stations at 1 Hz ---------------------------------------------------------------------


async def _feed_cpu(stations: int, seconds: float, parts: tuple[str, ...]) -> float:
    line = wide_plant(stations)
    prefix, group = f"bench/{uuid.uuid4().hex[:8]}/area", f"bench{uuid.uuid4().hex[:6]}"
    northbound = bool(parts)
    if northbound:
        line = with_northbound(line, prefix, group, parts)
    sup = Supervisor(line, journal=Journal())
    nb = Northbound(sup, line)
    await nb.start()
    if nb.opcua is not None:
        async with asyncio.timeout(120):
            await nb.opcua.started.wait()
        await asyncio.sleep(1.0)  # births sent
    names = list(line.stations)
    batches = 10  # every 100 ms a tenth of the stations change
    tick = 0

    async def feed() -> None:
        nonlocal tick
        while True:
            start = time.monotonic()
            now = datetime.now(UTC)
            for name in names[tick % batches :: batches]:
                n = tick // batches
                sup.events.publish(
                    StationChanged(
                        station=name,
                        condition=("working", "starved")[n % 2],
                        state=(6, 1)[n % 2],
                        state_name=("Execute", "Idle")[n % 2],
                        units=(f"U{n:06d}",) if n % 2 == 0 else (),
                        load=1 - n % 2,
                        capacity=1,
                        in_service=True,
                        connected=True,
                        cycles=n,
                        passed=n,
                        rejected=0,
                        faults=0,
                        at=float(n),
                        wall=now,
                    )
                )
            tick += 1
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - start)))

    task = asyncio.create_task(feed())
    await asyncio.sleep(1.0)  # settle
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, wall1 = time.process_time(), time.monotonic()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    dropped = [s.memory_dropped + s.events_dropped for s in nb.statistics().links]
    await nb.stop()
    if northbound:
        print(f"  messages or events dropped: {dropped}")
    return (cpu1 - cpu0) / (wall1 - wall0)


def cpu_rows(seconds: float) -> None:
    quiet()
    base = aio.run(_feed_cpu(500, seconds, ()))
    print(f"500 stations changing at 1 Hz each ({seconds:.0f} s window)")
    print(f"  CPU share, feed alone: {base * 100:.1f} % of a core")
    for parts in (PARTS, *((p,) for p in PARTS)):
        on = aio.run(_feed_cpu(500, seconds, parts))
        print(
            f"  with {' + '.join(parts):26}: {on * 100:4.1f} % of a core, "
            f"northbound's share {(on - base) * 100:4.1f} %"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer units, shorter window")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=aio.SWITCH_INTERVAL_S,
        help="the interpreter's thread switch interval linectl sets, in seconds (Python's "
        "default is 0.005): how long the line's loop may wait for the OPC UA server's thread",
    )
    parser.add_argument("--latency-only", action="store_true", help="skip the CPU rows")
    args = parser.parse_args()
    aio.SWITCH_INTERVAL_S = args.switch_interval
    quiet()
    print(f"thread switch interval {args.switch_interval * 1000:g} ms")
    latency_rows(60 if args.quick else 200)
    if not args.latency_only:
        cpu_rows(5 if args.quick else 15)


if __name__ == "__main__":
    main()
