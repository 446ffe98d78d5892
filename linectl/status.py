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
from linectl.bottleneck import ConstraintMonitor
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


def constraint_line(constraint: ConstraintMonitor | None, predicted: str) -> Text:
    """``constraint test (predicted test)``, with the shifting stations when there are."""
    now = None if constraint is None else constraint.current
    measured = "-" if now is None or now.station is None else now.station
    text = Text.assemble("constraint ", (measured, "bold"), f" (predicted {predicted})")
    if now is not None and now.is_shifting:
        text.append(f"   shifting between {', '.join(now.shifting)}", style="yellow")
    return text


def render(
    sup: Supervisor,
    predicted_per_h: float,
    constraint: ConstraintMonitor | None = None,
    predicted_bottleneck: str = "",
) -> Group:
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
    # Statistics are in line time, so rates read like the plant's own whatever time_scale.
    measured = "-" if rate is None else f"{rate:,.1f}"
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
    at_constraint = None if constraint is None else constraint.current.station
    for st in stats.stations.values():
        table.add_row(
            f"{st.name} ◀" if st.name == at_constraint else st.name,
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
    parts = [head, pace, constraint_line(constraint, predicted_bottleneck), table]
    if quarantine:
        parts.append(Text("quarantine (latest): " + "; ".join(quarantine), style="red"))
    parts.append(Text("Ctrl-C stops release, finishes the units in process and exits", "dim"))
    return Group(*parts)


@contextlib.asynccontextmanager
async def live_status(
    sup: Supervisor, refresh_s: float = 0.5, *, constraint: ConstraintMonitor | None = None
) -> AsyncIterator[None]:
    analysis = analyze(sup.line)
    predicted = analysis.throughput_per_h

    def board() -> Group:
        return render(sup, predicted, constraint, analysis.bottleneck)

    async def refresh(live: Live) -> None:
        while True:
            await asyncio.sleep(refresh_s)
            live.update(board())

    with Live(board(), refresh_per_second=4, transient=False) as live:
        task = asyncio.create_task(refresh(live), name="status")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            live.update(board())
