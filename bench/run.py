"""The benchmark suite: one command, one table, written with the machine's description into
docs/performance.md (between its ``bench:begin`` and ``bench:end`` markers; the prose around
them is kept).

    .venv/bin/python bench/run.py            # everything, about 8 minutes
    .venv/bin/python bench/run.py --quick    # a subset, about 3 minutes
    .venv/bin/python bench/run.py --no-write # print only

Sections: controller efficiency, handover latency, scale, store write rate, CPU per unit-step
beside the same line with no store, many single-station PLCs beside a plain pymodbus loop and a
raw asyncio poller, and uvloop against asyncio's loop (bench/supervisor.py, bench/store.py
and bench/plcs.py hold the measurements; definitions are in their docstrings and in
docs/performance.md). Targets are checked here and marked ok or
MISSED; no test asserts them, since the figures depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import plcs as plcs_bench
import store as store_bench
import supervisor as sup_bench

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Longest a whole run may take; a section that would start after it is skipped.
BUDGET_S = {True: 240.0, False: 720.0}


def machine() -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"CPU: {model}, {os.cpu_count()} cores",
        f"Python {platform.python_version()} ({platform.python_implementation()})",
        f"OS: {platform.platform()}",
    ]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def store_rows(quick: bool) -> list[sup_bench.Row]:
    seconds = 1.0 if quick else 3.0
    stations = [1, 16]
    rows = []

    async def sqlite() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
            for n in stations:
                rows.append(_store_row(await store_bench.run("sqlite", url, n, seconds)))

    async def postgres() -> None:
        name, url = store_bench._pg_database(store_bench.PG_ADMIN)
        try:
            for n in stations:
                rows.append(_store_row(await store_bench.run("postgresql", url, n, seconds)))
        finally:
            store_bench._drop_pg_database(store_bench.PG_ADMIN, name)

    asyncio.run(sqlite())
    try:
        asyncio.run(postgres())
    except Exception as exc:  # no server here: say so in the table instead of failing the run
        rows.append(sup_bench.Row("store", "postgresql", {"unavailable": f"{exc}"[:80]}))
    return rows


def _store_row(r: store_bench.Result) -> sup_bench.Row:
    return sup_bench.Row(
        "store",
        f"{r.database}, {r.stations} concurrent station(s)",
        {
            "step writes/s": f"{r.step_writes_per_s:,.0f}",
            "writes per commit": f"{r.writes / r.batches:.1f}",
        },
    )


SECTIONS = ["efficiency", "handover", "scale", "store", "cost", "plcs", "loop"]


def run_section(name: str, quick: bool) -> list[sup_bench.Row]:
    if name == "store":
        return store_rows(quick)
    if name == "plcs":
        return plcs_bench.rows(quick)
    if name == "loop":
        return sup_bench.loop_rows(quick) + plcs_bench.loop_rows(quick)
    return sup_bench.SECTIONS[name](quick)


def table(rows: list[sup_bench.Row]) -> list[str]:
    out = ["| section | case | figures | target |", "|---|---|---|---|"]
    for r in rows:
        figures = "; ".join(f"{k} {v}" for k, v in r.figures.items())
        out.append(f"| {r.section} | {r.case} | {figures} | {r.verdict} |")
    return out


def write_doc(block: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + BEGIN + "\n" + "\n".join(block) + "\n" + END + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A ~2-minute subset.")
    parser.add_argument("--section", choices=SECTIONS, action="append", help="Only these.")
    parser.add_argument("--no-write", action="store_true", help="Do not update the doc.")
    args = parser.parse_args()
    sup_bench.quiet()
    started = time.monotonic()
    load_before = load()
    print("\n".join(machine()), f"\nload average (1, 5, 15 min) at start: {load_before}\n")
    rows: list[sup_bench.Row] = []
    skipped: list[str] = []
    for name in args.section or SECTIONS:
        if time.monotonic() - started > BUDGET_S[args.quick]:
            skipped.append(name)
            continue
        t0 = time.monotonic()
        try:
            section = run_section(name, args.quick)
        except Exception as exc:  # one failed section must not lose the others' figures
            section = [sup_bench.Row(name, "failed", {"error": f"{type(exc).__name__}: {exc}"})]
        for line in table(section)[2 if rows else 0 :]:
            print(line, flush=True)
        print(f"  ({name}: {time.monotonic() - t0:.0f} s, load {load()})", file=sys.stderr)
        rows += section
    elapsed = time.monotonic() - started
    load_after = load()
    block = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `bench/run.py"
        f"{' --quick' if args.quick else ''}`, {elapsed:.0f} s.",
        "",
        *[f"- {line}" for line in machine()],
        f"- load average (1, 5, 15 min): {load_before} at start, {load_after} at the end",
        "",
        *table(rows),
    ]
    if skipped:
        block += ["", f"Skipped for time: {', '.join(skipped)}."]
    print(f"\nload average at the end: {load_after}; {elapsed:.0f} s")
    if not args.no_write:
        write_doc(block)
        print(f"written to {DOC}")


if __name__ == "__main__":
    main()
