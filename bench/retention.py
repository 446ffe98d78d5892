"""How fast the trace store grows, and what pruning it costs the line (issue 17's figures).

1. Growth: a store filled through the TraceStore API with the demo line's traffic over
   ``--hours`` of line time (timestamps simulated: units released at the line's predicted
   interval, every step with its intent, acceptance, result and the station's reset event,
   2 % rejects quarantined). Prints the database size and step rows per hour.
2. Prune while the line writes: a store of ``--steps`` old finished steps is pruned by
   ``linectl prune`` (its own process, as on a floor host) while this process writes one
   durable step intent (the write a handover waits for) every ``--every-ms``. Prints the
   longest and 99th-percentile intent latency during the prune, the same without a prune,
   and the rows per second removed.

    .venv/bin/python bench/retention.py                      # 8 h growth, 50 000-step prune
    .venv/bin/python bench/retention.py --steps 1000000      # the issue's 1 million
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from linectl.analysis import analyze
from linectl.config import ForkStep, Line, RouteStep, load_config
from linectl.store import TraceStore

ROOT = Path(__file__).resolve().parent.parent


def visits(flow: list, n: int) -> Iterator[str]:
    """Stations unit ``n`` visits: round-robin through routes, every branch of a fork."""
    for step in flow:
        if isinstance(step, str):
            yield step
        elif isinstance(step, RouteStep):
            branches = step.route.branches
            yield from visits(branches[n % len(branches)], n)
        elif isinstance(step, ForkStep):
            for branch in step.fork:
                yield from visits(branch, n)


async def fill(
    store: TraceStore,
    line: Line,
    units: int,
    start: datetime,
    *,
    interval_s: float | None = None,
    first_id: int = 1,
    reject_every: int = 50,
) -> int:
    """Write ``units`` units of ``line`` through the store API, from ``start`` at the line's
    predicted interval; return the steps written. Every ``reject_every``-th is quarantined."""
    interval = interval_s or analyze(line, 100).interval_s
    steps = 0
    for i in range(units):
        uid = first_id + i
        at = start + timedelta(seconds=i * interval)
        await store.unit_released(uid, f"{line.line}-{uid:07d}", at)
        path = list(visits(line.flow, uid))
        rejected = path[-1] if uid % reject_every == 0 else None
        for station in path:
            cycle = line.stations[station].cycle_s
            await store.step_intended(uid, station, 0, 1, uid & 0xFFFF, at)
            await store.step_accepted(uid, station, 1, at + timedelta(milliseconds=20))
            at += timedelta(seconds=cycle)
            result = "reject" if station == rejected else "pass"
            await store.step_finished(uid, station, 1, at, result, plc_cycle_s=cycle)
            await store.station_event(station, "reset", at, None, "slot 0")
            steps += 1
            if result == "reject":
                await store.unit_quarantined(uid, f"rejected at {station}", at)
                break
        else:
            await store.unit_finished(uid, at)
    await store.flush()
    return steps


def sqlite_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in [path, *path.parent.glob(path.name + "-*")])


async def growth(line: Line, hours: float, work: Path) -> None:
    db = work / "growth.sqlite3"
    analysis = analyze(line, 100)
    units = int(hours * 3600 / analysis.interval_s)
    start = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
    t0 = time.perf_counter()
    async with await TraceStore.open(f"sqlite:///{db}", line.line) as store:
        steps = await fill(store, line, units, start, interval_s=analysis.interval_s)
    took = time.perf_counter() - t0
    size = sqlite_bytes(db)
    print(f"growth: {hours:g} h of line '{line.line}' (a unit every {analysis.interval_s:.1f} s)")
    print(f"  units {units}, step rows {steps} ({steps / hours:.0f} per hour)")
    print(
        f"  SQLite size {size / 1e6:.2f} MB ({size / hours / 1e6:.3f} MB per hour, "
        f"{size / steps:.0f} bytes per step incl. unit and event rows); "
        f"about {size / hours * 24 * 365 / 1e9:.1f} GB a year unpruned"
    )
    print(f"  (written in {took:.1f} s through the store API)")


async def intents(
    store: TraceStore, stop: asyncio.Event, every_s: float, first: int
) -> list[float]:
    """Durable step intents at a steady pace; the latency of each."""
    latencies = []
    now = datetime.now(UTC)
    for n in itertools.count(first):
        if stop.is_set():
            break
        await store.unit_released(n, f"live-{n:07d}", now)
        t0 = time.perf_counter()
        await store.step_commanded(n, "kitting", 0, 1, n & 0xFFFF, now)
        latencies.append(time.perf_counter() - t0)
        await store.step_finished(n, "kitting", 1, now, "pass")
        await asyncio.sleep(every_s)
    return latencies


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99, p999 = (ordered[min(len(ordered) - 1, int(len(ordered) * q))] for q in (0.99, 0.999))
    over = sum(1 for t in latencies if t > 0.1)
    return (
        f"{len(latencies)} intents, median {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, p99.9 {p999 * 1000:.1f} ms, "
        f"longest {ordered[-1] * 1000:.1f} ms, {over} over 100 ms"
    )


async def prune_under_load(line: Line, steps: int, every_s: float, work: Path) -> None:
    db = work / "prune.sqlite3"
    url = f"sqlite:///{db}"
    per_unit = len(list(visits(line.flow, 0)))
    units = steps // per_unit + 1
    old = datetime(2025, 1, 1, tzinfo=UTC)
    t0 = time.perf_counter()
    async with await TraceStore.open(url, line.line, queue_size=50_000) as store:
        written = await fill(store, line, units, old, reject_every=10**9)
    print(
        f"prune: {written} old steps of {units} finished units written in "
        f"{time.perf_counter() - t0:.0f} s; SQLite {sqlite_bytes(db) / 1e6:.0f} MB"
    )
    config = work / "prune.yaml"
    text = (ROOT / "config" / "demo.yaml").read_text()
    config.write_text(text + f"\nstorage: {{url: '{url}'}}\n")
    async with await TraceStore.open(url, line.line) as store:
        stop = asyncio.Event()
        base = asyncio.create_task(intents(store, stop, every_s, 10_000_000))
        await asyncio.sleep(3)
        stop.set()
        baseline = await base
        stop = asyncio.Event()
        live = asyncio.create_task(intents(store, stop, every_s, 20_000_000))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "linectl.cli",
            "prune",
            str(config),
            "--older-than",
            "30d",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        out, err = await proc.communicate()
        stop.set()
        during = await live
    if proc.returncode != 0:
        raise SystemExit(f"linectl prune failed: {err.decode()}")
    report = out.decode().strip()
    rate = re.search(r"\(([\d.]+) rows/s\)", report)
    print(f"  {report}")
    print(f"  handover intents without prune: {summary(baseline)}")
    print(f"  handover intents during prune:  {summary(during)}")
    print(
        f"  => longest handover stall during prune {max(during) * 1000:.1f} ms "
        f"(limit 100 ms); removed {rate.group(1) if rate else '?'} rows/s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    parser.add_argument("--hours", type=float, default=8.0, help="Line time to fill.")
    parser.add_argument("--steps", type=int, default=50_000, help="Old steps to prune.")
    parser.add_argument("--every-ms", type=float, default=10.0, help="Pace of live intents.")
    args = parser.parse_args()
    line = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="linectl-retention-") as tmp:
        await growth(line, args.hours, Path(tmp))
        await prune_under_load(line, args.steps, args.every_ms / 1000, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
