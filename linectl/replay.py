"""Replay: a recorded run through the virtual engine under another flow or policy.

"What would last shift have produced with two test slots, or least_loaded instead of
round_robin?" The trace store holds every step a station ran: its PLC-measured cycle time
(``plc_cycle_s``), its result, its faults. Each station of the other config replays its own
recorded cycles in the order it ran them (same times, same rejects, same faults, through the
in-process driver's scripts); a station given more units than it had draws the rest from its
``sim:`` section. The same number of units is released as in the recorded window. Recorded
and replayed figures are computed with ``compare``'s definitions, side by side.

A reject follows the station's sequence of cycles, not the unit: under another flow a
different unit may get that cycle.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from linectl.analysis import analyze
from linectl.compare import (
    Measured,
    cell,
    figure_rows,
    fitted_interval,
    observed_bottleneck,
    percentile,
    skip_count,
)
from linectl.config import Line
from linectl.contract import Result
from linectl.errors import LinectlError
from linectl.simulate import Plan, run_once, virtual_line

MAX_UNITS = 100_000


class ReplayError(LinectlError):
    """A recorded window that cannot be replayed."""


@dataclass(frozen=True, slots=True)
class Replay:
    recorded: Measured
    replayed: Measured
    units: int  # released in the recorded window, and in the replay
    steps: int  # recorded steps replayed
    notes: tuple[str, ...]  # stations without a recording, or recorded but not in the flow

    def to_dict(self) -> dict[str, Any]:
        return {
            "units": self.units,
            "steps": self.steps,
            "notes": list(self.notes),
            "recorded": self.recorded.to_dict(),
            "replayed": self.replayed.to_dict(),
        }


def _seconds(at: datetime, t0: datetime, scale: float) -> float:
    return (at - t0).total_seconds() / scale


def scripts_of(units: Sequence[Any], time_scale: float) -> dict[str, list[tuple[float, int, int]]]:
    """Per station, the cycles it ran, in the order it ran them: (line seconds, result, fault
    code). A completed cycle's time is the PLC's own measurement where it reported one; a fault
    ends after the time from acceptance to Aborted. Refused and abandoned steps ran nothing."""
    ran: dict[str, list[tuple[datetime, int, tuple[float, int, int]]]] = defaultdict(list)
    for unit in units:
        for step in unit.steps:
            if step.accepted_at is None or step.finished_at is None:
                continue
            wall = (step.finished_at - step.accepted_at).total_seconds() / time_scale
            if step.result in ("pass", "reject"):
                result = Result.PASS if step.result == "pass" else Result.REJECT
                cycle = step.plc_cycle_s if step.plc_cycle_s else wall
                cycle_of = (max(cycle, 0.0), int(result), 0)
            elif step.result == "fault":
                cycle_of = (max(wall, 0.0), int(Result.PASS), step.fault_code or 1)
            else:
                continue
            ran[step.station].append((step.accepted_at, unit.unit_id, cycle_of))
    return {name: [c for *_, c in sorted(cycles)] for name, cycles in ran.items()}


def _overlap(a: float, b: float, start: float, end: float) -> float:
    return max(0.0, min(b, end) - max(a, start))


def recorded_figures(line: Line, units: Sequence[Any]) -> Measured:
    """``compare``'s figures of a recorded window, from the trace (line seconds). Blocked and
    starved time are not in the trace; they stay empty."""
    scale = line.time_scale
    t0 = min(u.released_at for u in units)
    released = sorted(_seconds(u.released_at, t0, scale) for u in units)
    done = [u for u in units if u.status == "finished" and u.finished_at is not None]
    finish = sorted(_seconds(u.finished_at, t0, scale) for u in done)
    leads = [_seconds(u.finished_at, u.released_at, scale) for u in done]
    if len(finish) < 1:
        raise ReplayError("no unit of the recorded window finished")
    skip = skip_count(len(finish), analyze(line, len(units))) if len(finish) >= 4 else 0
    interval = fitted_interval(finish, skip) if len(finish) - skip >= 2 else math.nan
    start = finish[max(skip, 1) - 1]
    end = released[-1] if released[-1] > start else finish[-1]
    span = end - start
    busy: dict[str, float] = dict.fromkeys(line.stations, 0.0)
    wip_area = 0.0
    for u in units:
        r = _seconds(u.released_at, t0, scale)
        left = u.finished_at or u.quarantined_at
        wip_area += _overlap(r, _seconds(left, t0, scale) if left else end, start, end)
        for step in u.steps:
            if step.accepted_at is not None and step.finished_at is not None:
                busy[step.station] = busy.get(step.station, 0.0) + _overlap(
                    _seconds(step.accepted_at, t0, scale),
                    _seconds(step.finished_at, t0, scale),
                    start,
                    end,
                )
    utilization = {
        n: busy.get(n, 0.0) / (st.capacity * span) if span > 0 else 0.0
        for n, st in line.stations.items()
    }
    return Measured(
        units=len(finish),
        interval_s=interval,
        throughput_per_h=3600 / interval,
        lead_time_p50_s=percentile(leads, 0.5),
        lead_time_p95_s=percentile(leads, 0.95),
        makespan_s=finish[-1],
        bottleneck=observed_bottleneck(line, utilization),
        utilization=utilization,
        finish_times_s=tuple(finish),
        handover_p50_ms=math.nan,
        handover_p99_ms=math.nan,
        wall_s=0.0,
        cpu_share=math.nan,
        cpu_us_per_step=math.nan,
        mean_wip=wip_area / span if span > 0 else math.nan,
        quarantined=sum(1 for u in units if u.quarantined_at is not None),
    )


async def replay(recorded_line: Line, units: Sequence[Any], other: Line, seed: int = 1) -> Replay:
    """Replay the recorded ``units`` (UnitRecords with steps, from the trace store of
    ``recorded_line``) under ``other``; call on a ``linectl.virtual`` loop."""
    if not any(u.steps for u in units):
        raise ReplayError("no steps recorded in the window")
    if len(units) > MAX_UNITS:
        raise ReplayError(f"more than {MAX_UNITS:,} units in the window; give a shorter one")
    scripts = scripts_of(units, recorded_line.time_scale)
    notes = [
        f"station '{n}' has no recorded cycles: drawn from its sim: section"
        for n in other.stations
        if n not in scripts
    ]
    notes += [
        f"station '{n}' was recorded but is not in the other flow: its cycles are not replayed"
        for n in scripts
        if n not in other.stations
    ]
    scripts = {n: c for n, c in scripts.items() if n in other.stations}
    plan = Plan(units=len(units), seed=seed)
    replayed = await run_once(virtual_line(other, plan), plan, seed=seed, scripts=scripts)
    return Replay(
        recorded=recorded_figures(recorded_line, units),
        replayed=replayed,
        units=len(units),
        steps=sum(len(c) for c in scripts.values()),
        notes=tuple(notes),
    )


def replay_rows(result: Replay, stations: Sequence[str]) -> list[tuple[str, list[str]]]:
    """One row per figure: recorded, then replayed."""
    rows: list[tuple[str, list[str]]] = []
    for fig in figure_rows(stations):
        if isinstance(fig, str):
            if fig in ("blocked", "starved"):
                break  # not in the trace: nothing to set beside the replay
            rows.append((fig, ["", ""]))
            continue
        rows.append(
            (
                fig.label,
                [cell(fig.fmt, fig.measured(m)) for m in (result.recorded, result.replayed)],
            )
        )
    return rows
