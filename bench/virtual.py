"""Virtual-time benchmark: what a simulation costs (issue 12's figures).

    .venv/bin/python bench/virtual.py [--quick] [--profile]

Each row runs ``linectl.simulate`` exactly as ``linectl simulate`` does (the real supervisor,
in-process PLCs, a virtual-time loop, no trace store unless the row says so) and prints the
wall time and this process's CPU time, with the targets of issue 12:

- scenario B hybrid, 1,000 units: under 2 s on one core;
- an 8-hour shift of config/demo.yaml with its spread, rejects and faults: under 1 s;
- 30 replications of that shift: under 10 s.

``--quick`` leaves out the 30 replications (most of the run's time). ``--profile`` adds the 15
functions with the most own time in one demo shift, and where the time goes by module. CPU
time is the honest figure on a shared machine: wall time includes whatever else the machine
runs (the load average is printed).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from linectl.config import load_config
from linectl.simulate import Plan, Simulation, run, simulate

ROOT = Path(__file__).resolve().parent.parent


def timed(work: Callable[[], list[Simulation]]) -> tuple[float, float, list[Simulation]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = work()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def sim(config: str, plan: Plan) -> Callable[[], list[Simulation]]:
    line = load_config(ROOT / config)
    return lambda: run(simulate([(config, line)], plan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="without the 30 replications")
    parser.add_argument("--profile", action="store_true", help="profile one demo shift")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("linectl").setLevel(logging.ERROR)

    rows = [
        ("scenario B hybrid, 1,000 units", "config/scenario-b-hybrid.yaml", Plan(units=1000), 2.0),
        (
            "scenario B hybrid, 1,000 units, SQLite store on tmpfs",
            "config/scenario-b-hybrid.yaml",
            Plan(units=1000, db="memory"),
            None,
        ),
        ("demo, 8-hour shift", "config/demo.yaml", Plan(units=None, hours=8), 1.0),
        (
            "demo, 8-hour shift, 30 replications",
            "config/demo.yaml",
            Plan(units=None, hours=8, replications=30),
            10.0,
        ),
    ]
    if args.quick:
        rows = [row for row in rows if row[2].replications == 1]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cores")
    print(f"{'run':58s} {'wall s':>8s} {'CPU s':>8s} {'target':>8s}  figures")
    for label, config, plan, target in rows:
        wall, cpu, (result,) = timed(sim(config, plan))
        m = result.runs[0]
        steps = sum(m.units for m in result.runs)  # finished units, for a per-unit cost below
        verdict = "" if target is None else ("ok" if cpu < target else "MISSED")
        figures = (
            f"interval {m.interval_s:.1f} s, {m.units} finished, {m.quarantined} quarantined"
            f" (run 1); {cpu / steps * 1e6:.0f} µs CPU per finished unit"
        )
        goal = "" if target is None else f"< {target:g}"
        print(f"{label:58s} {wall:8.2f} {cpu:8.2f} {goal:>8s}  {verdict:6s} {figures}")

    if args.profile:
        profiler = cProfile.Profile()
        work = sim("config/demo.yaml", Plan(units=None, hours=8))
        profiler.enable()
        work()
        profiler.disable()
        stats = pstats.Stats(profiler)
        total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
        by_module: dict[str, float] = defaultdict(float)
        for (path, _line, _name), value in stats.stats.items():  # type: ignore[attr-defined]
            parts = Path(path).parts
            if "linectl" in parts:
                key = "/".join(parts[parts.index("linectl") :])
            elif "simulators" in parts:
                key = "/".join(parts[parts.index("simulators") :])
            elif "asyncio" in parts:
                key = "asyncio (stdlib)"
            else:
                key = "other"
            by_module[key] += value[2]
        print(f"\nown time by module, one demo shift under cProfile ({total:.2f} s):")
        for key, seconds in sorted(by_module.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {seconds / total:6.1%}  {key}")
        print()
        stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
