"""A live status board in the terminal: each station's state, WIP, rate against prediction."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from linectl.analysis import analyze
from linectl.linestate import Condition, SupervisorStatistics
from linectl.supervisor import Supervisor

COLOURS = {
    Condition.WORKING: "green",
    Condition.BLOCKED: "yellow",
    Condition.STARVED: "cyan",
    Condition.FAULTED: "red",
    Condition.DISCONNECTED: "magenta",
    Condition.OUT_OF_SERVICE: "dim",
}


def units_per_hour(stats: SupervisorStatistics, window: int = 20) -> float | None:
    """Recent throughput in (wall) units per hour, from the last ``window`` finishes."""
    times = stats.finish_times[-window:]
    if len(times) < 2 or times[-1] == times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0]) * 3600


def render(sup: Supervisor, predicted_per_h: float) -> Group:
    stats = sup.statistics()
    rate = units_per_hour(stats)
    scale = sup.line.time_scale
    head = Text.assemble(
        (f"line {stats.line}", "bold"),
        f"   WIP {stats.wip}/{sup.max_wip}   released {stats.released}"
        f"   finished {stats.finished}   rejected {stats.rejected}"
        f"   quarantined {stats.quarantined}",
        ("   PAUSED" if stats.paused else "", "bold yellow"),
    )
    # Rates in config time, so they read like the plant's own numbers whatever time_scale.
    measured = "-" if rate is None else f"{rate * scale:,.1f}"
    pace = Text(f"units/h {measured} (predicted {predicted_per_h:,.1f})   time scale {scale:g}")
    table = Table(box=None, pad_edge=False)
    for column in (
        "station",
        "plc",
        "state",
        "condition",
        "load",
        "util",
        "cycles",
        "rej",
        "faults",
        "cycle s (nominal)",
    ):
        table.add_column(column, justify="right" if column not in ("station", "plc") else "left")
    for st in stats.stations.values():
        table.add_row(
            st.name,
            st.plc,
            st.state.label,
            Text(st.condition.value, style=COLOURS[st.condition]),
            f"{st.load}/{st.capacity}",
            f"{st.utilization:.0%}",
            str(st.cycles),
            str(st.rejected),
            str(st.faults),
            f"{st.ewma_cycle_s:.1f} ({st.cycle_s:g})",
        )
    quarantine = [f"{u.serial}: {u.reason}" for u in list(sup.quarantined.values())[-5:]]
    parts = [head, pace, table]
    if quarantine:
        parts.append(Text("quarantine (latest): " + "; ".join(quarantine), style="red"))
    parts.append(Text("Ctrl-C stops release, finishes the units in process and exits", "dim"))
    return Group(*parts)


@contextlib.asynccontextmanager
async def live_status(sup: Supervisor, refresh_s: float = 0.5) -> AsyncIterator[None]:
    predicted = analyze(sup.line).throughput_per_h

    async def refresh(live: Live) -> None:
        while True:
            await asyncio.sleep(refresh_s)
            live.update(render(sup, predicted))

    with Live(render(sup, predicted), refresh_per_second=4, transient=False) as live:
        task = asyncio.create_task(refresh(live), name="status")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            live.update(render(sup, predicted))
