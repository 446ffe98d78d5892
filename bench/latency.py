"""Throughput over a slow network (issue 13 defect 9): units per run and needless re-sends.

    .venv/bin/python bench/latency.py [--seconds 8] [--rtt 0 --rtt 0.3] [--protocol modbus]

A real supervisor runs a two-station line for ``--seconds`` against the bundled simulators,
reached through tests/faultproxy.py adding a steady round trip (half each way), with the
drivers' default deadline (``timeout_s`` 1 s) and poll interval (0.1 s). It prints the units
finished and the commands sent again after a timeout (the simulators count writes whose
sequence number they had already evaluated, plus calls that timed out). Before the deadlines
per phase, a 0.3 s round trip cut 14 units per 8 s to 2, with 12 re-sends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linectl.config import Line, parse_config
from linectl.supervisor import Supervisor
from simulators.runner import SimLine
from tests.faultproxy import FaultProxy

PLC = {
    "modbus": "{protocol: modbus, host: 127.0.0.1, port: 0}",
    "opcua": '{protocol: opcua, url: "opc.tcp://127.0.0.1:0"}',
}


def line_of(protocol: str) -> Line:
    modbus = protocol == "modbus"
    return parse_config(
        f"""
line: latency
plcs:
  p: {PLC[protocol]}
stations:
  a: {{plc: p, address: {0 if modbus else "a"}, cycle_s: 0.5}}
  b: {{plc: p, address: {24 if modbus else "b"}, cycle_s: 0.5}}
flow: [a, b]
"""
    )


async def one_run(protocol: str, rtt: float, seconds: float) -> tuple[int, int, int]:
    """(units finished, commands the PLC saw again, driver timeouts) in ``seconds``."""
    async with SimLine(line_of(protocol), free_ports=True) as sim:
        real = sim.line.plcs["p"]
        port = real.port if protocol == "modbus" else int(real.url.rsplit(":", 1)[1])  # type: ignore[union-attr]
        async with FaultProxy(("127.0.0.1", port)) as proxy:
            proxy.latency_s = rtt / 2
            if protocol == "modbus":
                plc = real.model_copy(update={"port": proxy.port})
            else:
                plc = real.model_copy(update={"url": f"opc.tcp://127.0.0.1:{proxy.port}"})
            line = sim.line.model_copy(update={"plcs": {"p": plc}})
            sup = Supervisor(line)
            task = asyncio.create_task(sup.run())
            try:
                await asyncio.sleep(seconds)
            finally:
                sup.stop()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(15):
                        await task
            repeated = sum(st.commands_repeated for st in sim.plcs["p"].stations.values())
            timeouts = sum(d.errors for d in sup.driver_statistics())
            return sup.finished, repeated, timeouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rtt", type=float, action="append", help="default: 0 and 0.3")
    parser.add_argument("--protocol", choices=sorted(PLC), action="append")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.seconds:g} s per row")
    print(f"{'protocol':9} {'rtt s':>6} {'units':>6} {'re-sent':>8} {'errors':>7} {'wall s':>7}")
    for protocol in args.protocol or sorted(PLC):
        for rtt in args.rtt or [0.0, 0.3]:
            started = time.perf_counter()
            units, repeated, errors = asyncio.run(one_run(protocol, rtt, args.seconds))
            wall = time.perf_counter() - started
            print(f"{protocol:9} {rtt:6.2f} {units:6d} {repeated:8d} {errors:7d} {wall:7.1f}")


if __name__ == "__main__":
    main()
