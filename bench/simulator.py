"""Can one simulator process carry 200 stations with 1 s cycles without drifting?

Starts `linectl sim` (one process: 20 Modbus PLCs of 10 stations, 1 s cycles) and `linectl run`
(another process) on a generated plant of parallel lines, lets it run, then reads from the
trace store every cycle time the simulated PLCs measured themselves. Drift is how much longer
than 1 s a cycle took: timer lateness in a simulator that cannot keep up.

    .venv/bin/python bench/simulator.py [--stations 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from linectl.store import TraceStore  # noqa: E402


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def plant(stations: int, db: str) -> str:
    plcs = stations // 10
    ports = free_ports(plcs + 2)
    out = ["line: simbench", "time_scale: 1.0", "plcs:"]
    for p in range(plcs):
        out.append(
            f"  p{p}: {{protocol: modbus, host: 127.0.0.1, port: {ports[p]}, poll_interval_s: 0.1}}"
        )
    out.append("stations:")
    for i in range(stations):
        out.append(f"  s{i}: {{plc: p{i // 10}, address: {(i % 10) * 24}, cycle_s: 1.0}}")
    branches = ", ".join(
        "[" + ", ".join(f"s{b * 4 + k}" for k in range(4)) + "]" for b in range(stations // 4)
    )
    out.append(f"flow: [{{route: {{policy: least_loaded, branches: [{branches}]}}}}]")
    out.append(f"storage: {{url: '{db}'}}")
    out.append(f"metrics: {{port: {ports[-2]}}}\napi: {{port: {ports[-1]}}}")
    return "\n".join(out) + "\n"


async def main(stations: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'simbench.sqlite3'}"
        config = Path(tmp) / "plant.yaml"
        config.write_text(plant(stations, db))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        sim = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "linectl.cli",
            "sim",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        while b"ready" not in (await sim.stdout.readline()):
            pass
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "linectl.cli",
            "run",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        await asyncio.sleep(seconds)  # the measurement window, not a wait for a condition
        for proc in (run, sim):
            proc.send_signal(signal.SIGINT)
        for proc in (run, sim):
            await proc.wait()
        async with await TraceStore.open(db, "simbench", create=False) as store:
            units = await store.units()
        cycles = [s.plc_cycle_s for u in units for s in u.steps if s.plc_cycle_s is not None]
    cycles.sort()
    drift = [c - 1.0 for c in cycles]
    print(f"{stations} stations, 1 s cycles, one simulator process, {seconds:.0f} s window")
    print(
        f"cycles measured by the simulated PLCs: {len(cycles)} "
        f"({len(cycles) / seconds:.0f}/s; {stations}/s if every station were busy)"
    )
    print(
        f"cycle time: mean {statistics.mean(cycles) * 1000:.1f} ms, "
        f"p50 {cycles[len(cycles) // 2] * 1000:.1f} ms, "
        f"p99 {cycles[int(len(cycles) * 0.99)] * 1000:.1f} ms, "
        f"max {cycles[-1] * 1000:.1f} ms"
    )
    print(
        f"drift (late by): mean {statistics.mean(drift) * 1000:.2f} ms, "
        f"p99 {drift[int(len(drift) * 0.99)] * 1000:.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.stations, args.seconds))
