"""A wide plant (parallel lines of 4 stations, 10 per Modbus PLC, 2 s cycles, 100 ms poll) run
in one process for a fixed time: the workload to profile the dispatcher with, e.g.

    py-spy record -f raw -o prof.txt -- .venv/bin/python bench/wide_plant.py 200 20

It prints the units finished, so runs can be compared at equal work.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linectl.config import Line, parse_config
from linectl.supervisor import Supervisor
from simulators.runner import SimLine


def wide(stations: int) -> Line:
    out = ["line: wide", "time_scale: 1.0", "plcs:"]
    for p in range(stations // 10):
        out.append(f"  p{p}: {{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.1}}")
    out.append("stations:")
    for i in range(stations):
        out.append(f"  s{i}: {{plc: p{i // 10}, address: {(i % 10) * 24}, cycle_s: 2}}")
    lines = ", ".join(
        "[" + ", ".join(f"s{b * 4 + k}" for k in range(4)) + "]" for b in range(stations // 4)
    )
    out.append(f"flow: [{{route: {{policy: round_robin, branches: [{lines}]}}}}]")
    return parse_config("\n".join(out))


async def main(stations: int, seconds: float) -> None:
    async with SimLine(wide(stations), free_ports=True) as sim:
        sup = Supervisor(sim.line)
        task = asyncio.create_task(sup.run())
        await asyncio.sleep(seconds)  # the measurement window
        sup.stop()
        await task
        print(f"{stations} stations, {seconds:g} s: {sup.finished} units finished")


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 200,
            float(sys.argv[2]) if len(sys.argv) > 2 else 20.0,
        )
    )
