"""The endpoints under a slow-connection attack: does the line notice?

    .venv/bin/python bench/endpoints.py [--slow 300] [--nofile 256] [--seconds 8]

A real supervisor runs the bundled demo line against its simulators, with the operator API and
/metrics, in this process under a file limit of ``--nofile`` descriptors (as a small service
unit would have). A separate process opens ``--slow`` connections to each endpoint and trickles
a request head one byte a second, opening a new connection whenever one is closed (slowloris).
Meanwhile this process measures:

- ``/status``: answered requests and their latency (one every 0.2 s, each with a 2 s deadline);
- a PLC reconnect: the simulator drops linectl's connections to one PLC; the time until the
  driver is connected again, once before the attack and once during it;
- the log: records and bytes linectl wrote during the attack, and tracebacks among them;
- each endpoint's counters (``statistics()``): evicted, refused, timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import resource
import sys
import time
import urllib.request
from pathlib import Path

from linectl.api import serve_api
from linectl.config import load_config
from linectl.metrics import serve_metrics
from linectl.supervisor import Supervisor
from simulators.runner import SimLine

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"

ATTACKER = """
import asyncio, resource, sys
# Not bound by the controller's file limit, which it inherits.
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
ports, n, seconds = [int(p) for p in sys.argv[1].split(",")], int(sys.argv[2]), float(sys.argv[3])
opened = 0

async def slow(port):
    global opened
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        opened += 1
        try:
            for byte in b"GET /status HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n":
                if loop.time() >= end:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1.0)
        except OSError:
            pass
        finally:
            writer.close()

async def main():
    async with asyncio.TaskGroup() as tg:
        for port in ports:
            for _ in range(n):
                tg.create_task(slow(port))
    print(opened)

asyncio.run(main())
"""


def get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=2) as reply:
        reply.read()
    return time.perf_counter() - started


def connected(sup: Supervisor, plcs: int) -> bool:
    drivers = sup.driver_statistics()
    return len(drivers) == plcs and all(d.connected for d in drivers)


async def reconnect_s(sim: SimLine, sup: Supervisor, plc: str) -> float:
    """Drop linectl's connections to ``plc``; seconds until its driver is connected again."""
    before = next(d for d in sup.driver_statistics() if d.plc == plc).reconnects
    started = time.perf_counter()
    sim.servers[plc].drop_connections()
    async with asyncio.timeout(30):
        while True:
            d = next(d for d in sup.driver_statistics() if d.plc == plc)
            if d.connected and d.reconnects > before:
                return time.perf_counter() - started
            await asyncio.sleep(0.01)


async def run(slow: int, seconds: float) -> None:
    line = load_config(DEMO)
    line = line.model_copy(
        update={
            "api": line.api.model_copy(update={"port": 0}),
            "metrics": line.metrics.model_copy(update={"port": 0}),
        }
    )
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    async with SimLine(line, free_ports=True) as sim:
        sup = Supervisor(sim.line)
        api = await serve_api(sup, sim.line)
        metrics = await serve_metrics(sup, sim.line, port=0)
        task = asyncio.create_task(sup.run())
        try:
            plc = next(iter(sim.line.plcs))
            async with asyncio.timeout(30):
                while not connected(sup, len(sim.line.plcs)):  # noqa: ASYNC110 - a bench poll
                    await asyncio.sleep(0.05)
            quiet = await reconnect_s(sim, sup, plc)
            log.truncate(0)
            log.seek(0)
            attacker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                ATTACKER,
                f"{api.port},{metrics.port}",
                str(slow),
                str(seconds),
                stdout=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(1.0)  # let the attack build up
            url = f"http://127.0.0.1:{api.port}/status"
            latencies, failures = [], 0
            end = time.perf_counter() + seconds - 2.0
            during = None
            while time.perf_counter() < end:
                try:
                    latencies.append(await asyncio.to_thread(get, url))
                except OSError:
                    failures += 1
                if during is None:
                    during = await reconnect_s(sim, sup, plc)
                await asyncio.sleep(0.2)
            out, _ = await attacker.communicate()
            text = log.getvalue()
        finally:
            sup.stop()
            await task
            await api.stop()
            await metrics.stop()
            logging.getLogger().removeHandler(handler)
    latencies.sort()
    print(
        f"slow connections: {slow} per endpoint for {seconds:.0f} s, opened {out.decode().strip()}"
    )
    print(
        f"/status: {len(latencies)} answered, {failures} failed; latency p50 "
        f"{latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
        if latencies
        else f"/status: 0 answered, {failures} failed"
    )
    print(
        f"PLC reconnect: {quiet:.2f} s before the attack, {during or float('nan'):.2f} s during it"
    )
    records = [r for r in text.splitlines() if r and not r.startswith(" ")]
    print(
        f"log during the attack: {len(records)} records, {len(text.encode())} bytes, "
        f"{text.count('Traceback')} tracebacks"
    )
    for r in records[:6]:
        print("   ", r[:160])
    for ep in (api.http, metrics.http):
        s = ep.statistics()
        print(
            f"{s.name}: accepted {s.accepted}, evicted {s.evicted}, refused {s.refused}, "
            f"timed out {s.timed_out}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=300, help="slow connections per endpoint")
    parser.add_argument("--nofile", type=int, default=256, help="this process's file limit")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.slow, args.seconds))


if __name__ == "__main__":
    main()
