"""Supervisor benchmark: controller efficiency, handover latency, scale and CPU per unit-step.

    .venv/bin/python bench/supervisor.py [--quick]          # or through bench/run.py

Every row runs a real supervisor with its real journal on a throwaway SQLite trace store
(``linectl.compare.measure``, the code behind ``linectl compare``) in this process, against
simulated PLCs in a separate process (multiprocessing, spawn), so this process's CPU is the
controller's: dispatch, drivers, journal and the store's writer thread.

- **efficiency** = predicted interval / measured interval (``linectl compare``'s steady-state
  interval: a least-squares fit over the finishes after the line has filled).
- **handover**, two ways. ``seen→START``: the supervisor's own figure (its ``handovers``
  deque), from the poll or notification that showed a step done to the next station's START
  echoed. ``PLC→PLC``: from the simulated station's Complete to the next station's Execute,
  both stamped in the simulator process on the system-wide monotonic clock; it adds the time
  to notice the Complete (up to one poll). Measured on a line where the next station is
  always free, so no row counts time spent blocked.
- **CPU share**: this process's CPU time / wall time over the steady window (1.0 = one core);
  **CPU/step**: the same CPU divided by the station cycles completed in the window.
- **peak RSS**: this process's peak resident memory during the row (VmHWM, reset before
  each row through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from linectl.analysis import analyze
from linectl.compare import Measured, measure, percentile, with_units
from linectl.config import Line, load_config, parse_config

HYBRID = "config/scenario-b-hybrid.yaml"


def quiet() -> None:
    # pymodbus and asyncua narrate every connection teardown at ERROR/WARNING.
    for name in ("pymodbus", "asyncua"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# --- line configs ---------------------------------------------------------------------------


def as_opcua(line: Line) -> Line:
    """The same line with every PLC an OPC UA server (subscriptions, publishing interval 0)
    and every station addressed by its name."""
    data = line.model_dump(mode="json", exclude_none=True)
    data["plcs"] = {
        name: {
            "protocol": "opcua",
            "url": "opc.tcp://127.0.0.1:0",
            "publishing_interval_s": 0,
            "timeout_s": 5,
            "connect_timeout_s": 10,
        }
        for name in line.plcs
    }
    for name, station in data["stations"].items():
        station["address"] = name
    data["line"] = f"{line.line}-opcua"
    return Line.model_validate(data)


def scaled_to_interval(line: Line, interval_wall_s: float) -> Line:
    """``line`` at the time scale that makes its predicted interval ``interval_wall_s``."""
    return line.model_copy(update={"time_scale": interval_wall_s / analyze(line).interval_s})


def wide_plant(stations: int, *, per_plc: int = 10, poll_s: float = 0.1) -> Line:
    """Parallel lines of 4 stations (the last may be shorter), 2 s cycles, on Modbus PLCs of
    ``per_plc`` stations each, one route balancing units over the lines; real time."""
    plcs = math.ceil(stations / per_plc)
    rows = ["line: wide", "time_scale: 1", "plcs:"]
    rows += [
        f"  p{i}: {{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: {poll_s}}}"
        for i in range(plcs)
    ]
    rows.append("stations:")
    names = [f"s{n:03d}" for n in range(stations)]
    for n, name in enumerate(names):
        rows.append(
            f"  {name}: {{plc: p{n // per_plc}, address: {(n % per_plc) * 24}, cycle_s: 2}}"
        )
    branches = [names[i : i + 4] for i in range(0, stations, 4)]
    rows.append("flow:")
    rows.append("  - route:")
    rows.append("      policy: least_loaded")
    rows.append("      branches:")
    rows += [f"        - [{', '.join(b)}]" for b in branches]
    return parse_config("\n".join(rows) + "\n")


def handover_line(protocol: str) -> Line:
    """Four lines of two stations; the second is twice as fast, so it is always free when the
    first is done: every handover is pure controller latency, never time blocked."""
    plc = {
        "modbus": "{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.01}",
        "opcua": '{protocol: opcua, url: "opc.tcp://127.0.0.1:0", publishing_interval_s: 0}',
    }[protocol]
    rows = ["line: handover", "time_scale: 0.05", "plcs:", f"  p0: {plc}", "stations:"]
    branches = []
    for i in range(4):
        for j, (kind, cycle) in enumerate((("a", 1), ("b", 0.5))):
            address = (2 * i + j) * 24 if protocol == "modbus" else f"{kind}{i}"
            rows.append(f"  {kind}{i}: {{plc: p0, address: {address!r}, cycle_s: {cycle}}}")
        branches.append(f"[a{i}, b{i}]")
    rows.append(f"flow: [{{route: {{policy: least_loaded, branches: [{', '.join(branches)}]}}}}]")
    return parse_config("\n".join(rows) + "\n")


# --- the simulator process ------------------------------------------------------------------


def sim_process(conn: Connection, line: Line) -> None:
    quiet()
    asyncio.run(_sim_main(conn, line))


async def _sim_main(conn: Connection, line: Line) -> None:
    from simulators.runner import SimLine

    # (station, unit, state name) -> first time seen, on the system-wide monotonic clock.
    stamps: dict[tuple[str, int, str], float] = {}
    async with SimLine(line, free_ports=True) as sim:

        def stamp(station: Any, slot: int) -> None:
            s = station.status(slot)
            if s.unit:
                stamps.setdefault((station.name, s.unit, s.state.name), time.monotonic())

        for plc in sim.plcs.values():
            plc.on_change(stamp)
        conn.send({name: server.endpoint_config() for name, server in sim.servers.items()})
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
    conn.send(stamps)


# --- the controller side ----------------------------------------------------------------------


@dataclass
class Run:
    line: Line
    measured: Measured
    stamps: dict[tuple[str, int, str], float]
    peak_rss_mb: float

    @property
    def efficiency(self) -> float:
        return analyze(self.line).interval_s / self.measured.interval_s


async def _recv(conn: Connection, timeout_s: float, what: str) -> Any:
    """The next message, waiting in a thread that always ends (a blocked ``recv`` would keep
    ``asyncio.run`` from returning)."""
    ready = await asyncio.get_running_loop().run_in_executor(None, conn.poll, timeout_s)
    if not ready:
        raise TimeoutError(f"simulator process: no {what} within {timeout_s:.0f} s")
    return conn.recv()


async def _controller(line: Line, deadline_s: float, durable: bool) -> Run:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=sim_process, args=(there, line), daemon=True)
    child.start()
    try:
        plcs = await _recv(here, 60, "endpoints")
        measured = await measure(line, plcs=plcs, deadline_s=deadline_s, durable=durable)
        here.send("stop")
        stamps = await _recv(here, 30, "stamps")
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
    return Run(line, measured, stamps, peak_rss_mb())


def reset_peak_rss() -> None:
    """Start this process's peak RSS (VmHWM) afresh (Linux: ``5 > /proc/self/clear_refs``)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak RSS since the last reset, or since it started."""
    with contextlib.suppress(OSError):
        for row in Path("/proc/self/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_line(
    line: Line, deadline_s: float = 120.0, *, durable: bool = True, loop: str | None = None
) -> Run:
    """One row: simulators in a spawned process, the supervisor in this one, on the event loop
    linectl would pick (``linectl.aio``: uvloop when installed) or on ``loop``."""
    from linectl import aio

    quiet()
    reset_peak_rss()
    return aio.run(_controller(line, deadline_s, durable), loop=loop)


def plc_handovers(run: Run) -> list[float]:
    """Seconds from a's Complete to b's Execute of the same unit, at the simulated PLC."""
    out = []
    for (station, unit, state), done in run.stamps.items():
        if state == "COMPLETE" and station.startswith("a"):
            started = run.stamps.get((f"b{station[1:]}", unit, "EXECUTE"))
            if started is not None:
                out.append(started - done)
    return out


# --- the rows -------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    case: str
    figures: dict[str, str]
    verdict: str = ""


def efficiency_rows(quick: bool) -> list[Row]:
    base = load_config(HYBRID)
    # (wall interval, units): enough units for a steady window, each run bounded in time.
    cases = [(0.1, 100), (0.02, 200)] if quick else [(1.0, 24), (0.1, 100), (0.02, 200)]
    rows = []
    for protocol in ("modbus", "opcua"):
        for interval, units in cases:
            line = scaled_to_interval(base, interval)
            line = with_units(as_opcua(line) if protocol == "opcua" else line, units)
            run = run_line(line)
            target = {0.1: 0.98, 0.02: 0.95}.get(interval)
            verdict = ""
            if target is not None:
                verdict = f">= {target}: {'ok' if run.efficiency >= target else 'MISSED'}"
            rows.append(
                Row(
                    "efficiency",
                    f"{protocol}, interval {interval * 1000:g} ms, {units} units",
                    {
                        "efficiency": f"{run.efficiency:.3f}",
                        "interval": f"{run.measured.interval_s * line.time_scale * 1e3:.1f} ms",
                        "CPU share": f"{run.measured.cpu_share:.0%}",
                        "CPU/step": f"{run.measured.cpu_us_per_step:,.0f} us",
                    },
                    verdict,
                )
            )
    return rows


def handover_rows(quick: bool) -> list[Row]:
    rows = []
    units = 120 if quick else 300
    for protocol, target_ms in (("modbus", 0.010 * 1000 + 2), ("opcua", 10.0)):
        run = run_line(with_units(handover_line(protocol), units))
        plc = plc_handovers(run)
        m = run.measured
        p99 = percentile(plc, 0.99) * 1000
        rows.append(
            Row(
                "handover",
                "modbus, poll 10 ms" if protocol == "modbus" else "opcua, publishing interval 0",
                {
                    "seen→START p50/p99": f"{m.handover_p50_ms:.1f} / {m.handover_p99_ms:.1f} ms",
                    "PLC→PLC p50/p99": f"{percentile(plc, 0.5) * 1000:.1f} / {p99:.1f} ms",
                    "samples": str(len(plc)),
                    "CPU/step": f"{m.cpu_us_per_step:,.0f} us",
                },
                f"p99 <= {target_ms:g} ms: {'ok' if p99 <= target_ms else 'MISSED'}",
            )
        )
    return rows


def scale_rows(quick: bool) -> list[Row]:
    rows = []
    for stations in [50, 500] if quick else [50, 200, 500]:
        line = wide_plant(stations)
        lines = math.ceil(stations / 4)
        # Each line runs 12 units: 8 s to fill, then one unit per 2 s per line, so the fit
        # has a steady stretch between the fill and the drain.
        line = with_units(line, 12 * lines)
        run = run_line(line, deadline_s=90)
        m = run.measured
        verdict = ""
        if stations == 500:
            ok = m.cpu_share < 0.5 and run.efficiency >= 0.97
            verdict = f"CPU < 50%, eff >= 0.97: {'ok' if ok else 'MISSED'}"
        rows.append(
            Row(
                "scale",
                f"{stations} stations, {lines} lines, {math.ceil(stations / 10)} PLCs",
                {
                    "efficiency": f"{run.efficiency:.3f}",
                    "CPU share": f"{m.cpu_share:.0%}",
                    "CPU/step": f"{m.cpu_us_per_step:,.0f} us",
                    "peak RSS": f"{run.peak_rss_mb:.0f} MB",
                },
                verdict,
            )
        )
    return rows


def cost_rows(quick: bool) -> list[Row]:
    """CPU per unit-step with the durable journal, and of the same line with no store beside
    it (the anchor: what the store adds), at a 100 ms interval."""
    rows = []
    base = with_units(scaled_to_interval(load_config(HYBRID), 0.1), 100)
    for protocol in ["modbus"] if quick else ["modbus", "opcua"]:
        line = as_opcua(base) if protocol == "opcua" else base
        runs = {durable: run_line(line, durable=durable) for durable in (True, False)}
        for durable, run in runs.items():
            m = run.measured
            figures = {
                "CPU/step": f"{m.cpu_us_per_step:,.0f} us",
                "CPU share": f"{m.cpu_share:.0%}",
                "efficiency": f"{run.efficiency:.3f}",
            }
            verdict = ""
            if durable:
                ratio = m.cpu_us_per_step / runs[False].measured.cpu_us_per_step
                figures["/ no store"] = f"{ratio:.2f}x"
                verdict = f"<= 1 ms: {'ok' if m.cpu_us_per_step <= 1000 else 'MISSED'}"
            else:
                verdict = f"<= 0.5 ms: {'ok' if m.cpu_us_per_step <= 500 else 'MISSED'}"
            store = "SQLite journal" if durable else "no store"
            rows.append(Row("cost", f"{protocol}, hybrid at 100 ms, {store}", figures, verdict))
    return rows


def loop_rows(quick: bool) -> list[Row]:
    """The hybrid line at 100 ms with the SQLite journal, on asyncio's loop and on uvloop."""
    line = with_units(scaled_to_interval(load_config(HYBRID), 0.1), 100)
    runs = {loop: run_line(line, loop=loop) for loop in ("asyncio", "uvloop")}
    rows = []
    for loop, run in runs.items():
        m = run.measured
        figures = {
            "CPU/step": f"{m.cpu_us_per_step:,.0f} us",
            "efficiency": f"{run.efficiency:.3f}",
        }
        if loop == "uvloop":
            gain = runs["asyncio"].measured.cpu_us_per_step / m.cpu_us_per_step
            figures["CPU/step, asyncio / uvloop"] = f"{gain:.2f}x"
        rows.append(Row("loop", f"modbus, hybrid at 100 ms, SQLite journal, {loop}", figures))
    return rows


SECTIONS: dict[str, Callable[[bool], list[Row]]] = {
    "efficiency": efficiency_rows,
    "handover": handover_rows,
    "scale": scale_rows,
    "cost": cost_rows,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A ~1-minute subset.")
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append")
    args = parser.parse_args()
    quiet()
    for name in args.section or list(SECTIONS):
        for row in SECTIONS[name](args.quick):
            figures = "  ".join(f"{k} {v}" for k, v in row.figures.items())
            print(f"{row.section:10} {row.case:45} {figures}  {row.verdict}", flush=True)


if __name__ == "__main__":
    main()
