"""Prototype and measure: run a line config against its simulators and set what it does beside
what ``analyze`` promised.

Each config runs its bundled simulators (free ports) and a real supervisor in this process, on
a throwaway SQLite trace store in a temporary directory, so the journal's commits cost what
they cost in production. ``release.count`` units are released at time 0 into an empty line.
Times are reported in config seconds: wall seconds divided by ``time_scale``.

Definitions of the measured figures:

- **interval**: the slope of a least-squares line through the finish times of the units
  after the first ``k``, ``k`` = the larger of half the units and the line's work in process
  at saturation (Little's law: ceil(lead time / interval), both predicted), but at most
  ``units - 3``. Skipping them leaves out the line filling up; a fit rather than the mean gap
  is not thrown off by units finishing in pairs (two parallel lines in step).
- **throughput**: 3600 / interval, units per hour.
- **lead time p50, p95**: release to finish of every unit. A saturated line keeps units
  waiting (blocked) in front of its bottleneck, so these exceed the empty-line lead time that
  ``analyze`` predicts; that gap is queueing, not the controller.
- **makespan**: first release to last finish.
- **utilization**: share of a station's slot-time spent executing a unit (the supervisor's
  statistics), over the steady window: from the ``k``-th finish to the last release (or the
  last finish, if the line never saturated before release ended).
- **bottleneck**: the most utilized station, unless it lies in a route each of whose branches
  holds a station within ``NEAR_SATURATED`` of that utilization: then the route
  (``route@<path>``, the outermost such), as ``analyze`` names a balancing route's limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linectl.analysis import Analysis, analyze, route_label
from linectl.config import Line, RouteStep, flow_stations, walk
from linectl.journal import Journal

# A station counts as saturated within this much utilization of the busiest one.
NEAR_SATURATED = 0.05
# Slack on top of the predicted makespan before a run is abandoned.
DEADLINE_FACTOR = 3.0
DEADLINE_SLACK_S = 30.0


@dataclass(frozen=True, slots=True)
class Measured:
    """What one run of a line did, in config seconds."""

    units: int
    interval_s: float
    throughput_per_h: float
    lead_time_p50_s: float
    lead_time_p95_s: float
    makespan_s: float
    bottleneck: str
    utilization: dict[str, float]
    finish_times_s: tuple[float, ...]  # since the first release, in finish order
    handover_p50_ms: float  # wall ms from seeing a step done to the next START confirmed,
    handover_p99_ms: float  # including any time blocked waiting for room downstream
    wall_s: float
    cpu_share: float  # this process's CPU / wall over the steady window (1.0 = one core)
    cpu_us_per_step: float  # this process's CPU per station cycle over the steady window

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "throughput_per_h": self.throughput_per_h,
            "lead_time_p50_s": self.lead_time_p50_s,
            "lead_time_p95_s": self.lead_time_p95_s,
            "makespan_s": self.makespan_s,
            "bottleneck": self.bottleneck,
            "stations": {n: {"utilization": u} for n, u in self.utilization.items()},
            "handover_p50_ms": self.handover_p50_ms,
            "handover_p99_ms": self.handover_p99_ms,
            "wall_s": self.wall_s,
            "cpu_share": self.cpu_share,
            "cpu_us_per_step": self.cpu_us_per_step,
        }


@dataclass(frozen=True, slots=True)
class Comparison:
    config: str
    line: Line
    predicted: Analysis
    measured: Measured

    @property
    def interval_error(self) -> float:
        """Measured interval relative to the predicted one, minus 1 (0.02 = 2 % slower)."""
        return self.measured.interval_s / self.predicted.interval_s - 1

    def to_dict(self) -> dict[str, Any]:
        """The keys of ``analyze --json``, plus ``predicted`` and ``measured`` side by side."""
        p = self.predicted
        data = p.to_dict()
        data["config"] = self.config
        data["time_scale"] = self.line.time_scale
        data["predicted"] = {
            "interval_s": p.interval_s,
            "throughput_per_h": p.throughput_per_h,
            "lead_time_p50_s": p.lead_time_s,
            "lead_time_p95_s": p.lead_time_s,
            "makespan_s": p.makespan_s,
            "bottleneck": p.bottleneck,
            "stations": {n: {"utilization": s.utilization} for n, s in p.stations.items()},
        }
        data["measured"] = self.measured.to_dict()
        return data


# --- pure figures -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def skip_count(units: int, predicted: Analysis) -> int:
    """How many first finishes the interval leaves out (see the module docstring)."""
    wip = math.ceil(predicted.lead_time_s / predicted.interval_s)
    return max(0, min(max(units // 2, wip), units - 3))


def fitted_interval(finish_times: Sequence[float], skip: int) -> float:
    """Least-squares slope of finish time against finish number, after the first ``skip``."""
    ys = sorted(finish_times)[skip:]
    n = len(ys)
    if n < 2:
        raise ValueError(f"need 2 finishes after the first {skip} to fit an interval, got {n}")
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    num = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(ys))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def observed_bottleneck(line: Line, utilization: dict[str, float]) -> str:
    """The busiest station, or the outermost route whose branches are all near-saturated."""
    busiest = max(utilization, key=lambda n: utilization[n])
    top = utilization[busiest]
    for path, step in walk(line.flow):
        if not isinstance(step, RouteStep):
            continue
        branches = [flow_stations(b) for b in step.route.branches]
        if not any(busiest in b for b in branches):
            continue
        if all(
            b and max(utilization.get(n, 0.0) for n in b) >= top - NEAR_SATURATED for b in branches
        ):
            return route_label(path)
    return busiest


# --- a run ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mark:
    """The supervisor's clock, busy slot-seconds and cycles per station, and process CPU."""

    elapsed: float
    busy: dict[str, float]
    cycles: int
    cpu: float


@dataclass
class _Window:
    """The marks at the start and end of the steady window."""

    skip: int
    start: _Mark | None = None
    end: _Mark | None = None
    released_all: bool = False
    count: int = 0


def _mark(sup: Any) -> _Mark:
    stats = sup.statistics()
    return _Mark(
        stats.elapsed_s,
        {n: s.utilization * s.capacity * stats.elapsed_s for n, s in stats.stations.items()},
        sum(s.cycles for s in stats.stations.values()),
        time.process_time(),
    )


def with_units(line: Line, units: int, time_scale: float | None = None) -> Line:
    """``line`` releasing ``units`` units (and at ``time_scale``, if given)."""
    update: dict[str, Any] = {"release": line.release.model_copy(update={"count": units})}
    if time_scale is not None:
        update["time_scale"] = time_scale
    return line.model_copy(update=update)


async def measure(
    line: Line,
    *,
    plcs: dict[str, Any] | None = None,
    on_progress: Callable[[int], None] | None = None,
    db_dir: Path | None = None,
    deadline_s: float | None = None,
    durable: bool = True,
) -> Measured:
    """Run ``release.count`` units of ``line`` against its simulators; see the module docstring.

    ``plcs`` (PLC name -> config) points at simulators already running elsewhere, such as in
    another process, instead of starting them here. ``on_progress(finished)`` is called as
    units finish; ``deadline_s`` bounds the run (wall). ``durable=False`` runs without a trace
    store, for benchmarks that separate the journal's cost from the rest.
    """
    from linectl.store import TraceStore
    from linectl.supervisor import Supervisor
    from simulators.runner import SimLine

    units = line.release.count
    if units is None or units < 4:
        raise ValueError("measure needs release.count of at least 4 units")
    predicted = analyze(line, units)
    if deadline_s is None:
        deadline_s = predicted.makespan_s * line.time_scale * DEADLINE_FACTOR + DEADLINE_SLACK_S
    window = _Window(skip=skip_count(units, predicted))
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as stack:
        if db_dir is None:
            db_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="linectl-")))
        url = f"sqlite:///{db_dir / (line.line + '.sqlite3')}"
        sims = (
            SimLine(line, free_ports=True)
            if plcs is None
            else contextlib.nullcontext(_Elsewhere(line.model_copy(update={"plcs": plcs})))
        )
        async with sims as sim:
            stores = await TraceStore.open(url, line.line) if durable else contextlib.nullcontext()
            async with stores as store:
                sup = Supervisor(sim.line, journal=Journal(store), exit_when_done=True)

                def on_event() -> None:
                    # Called by the supervisor at every change: mark the steady window's ends.
                    if window.start is None and sup.finished >= max(window.skip, 1):
                        window.start = _mark(sup)
                    if not window.released_all and sup.released >= units:
                        window.released_all = True
                        if window.start is not None:
                            window.end = _mark(sup)
                    if on_progress is not None and sup.finished != window.count:
                        window.count = sup.finished
                        on_progress(sup.finished)

                sup.on_event = on_event
                started = loop.time()
                try:
                    async with asyncio.timeout(deadline_s):
                        await sup.run()
                except TimeoutError:
                    raise TimeoutError(
                        f"line '{line.line}': {sup.finished} of {units} units finished within "
                        f"the {deadline_s:.0f} s deadline"
                    ) from None
                wall = loop.time() - started
                final = _mark(sup)
                stats = sup.statistics()
    if stats.finished < units:
        raise RuntimeError(
            f"line '{line.line}': only {stats.finished} of {units} units finished "
            f"({stats.quarantined} quarantined)"
        )
    scale = line.time_scale
    releases = [f - lead for f, lead in zip(stats.finish_times, stats.lead_times, strict=True)]
    first_release = min(releases)
    finish = tuple(sorted((t - first_release) / scale for t in stats.finish_times))
    interval = fitted_interval(finish, window.skip)
    start = window.start or final
    end = window.end if window.end is not None and window.end.elapsed > start.elapsed else final
    span = end.elapsed - start.elapsed
    utilization = {
        n: (end.busy[n] - start.busy[n]) / (line.stations[n].capacity * span) if span > 0 else 0.0
        for n in line.stations
    }
    steps = end.cycles - start.cycles
    leads = [t / scale for t in stats.lead_times]
    handovers = list(stats.handovers)
    return Measured(
        units=units,
        interval_s=interval,
        throughput_per_h=3600 / interval,
        lead_time_p50_s=percentile(leads, 0.5),
        lead_time_p95_s=percentile(leads, 0.95),
        makespan_s=finish[-1],
        bottleneck=observed_bottleneck(line, utilization),
        utilization=utilization,
        finish_times_s=finish,
        handover_p50_ms=percentile(handovers, 0.5) * 1000,
        handover_p99_ms=percentile(handovers, 0.99) * 1000,
        wall_s=wall,
        cpu_share=(end.cpu - start.cpu) / span if span > 0 else math.nan,
        cpu_us_per_step=(end.cpu - start.cpu) / steps * 1e6 if steps else math.nan,
    )


@dataclass(frozen=True, slots=True)
class _Elsewhere:
    """Stands in for a SimLine when the simulators run in another process."""

    line: Line


async def compare(
    configs: Sequence[tuple[str, Line]],
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Comparison]:
    """Measure every line at once (one event loop), each against its own simulators.

    ``on_progress(index, finished)`` reports units finished per config. Concurrent runs share
    the process's CPU; on a busy machine run them one at a time with separate calls.
    """

    def reporter(i: int) -> Callable[[int], None] | None:
        if on_progress is None:
            return None
        return lambda finished: on_progress(i, finished)

    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(measure(line, on_progress=reporter(i)), name=f"compare-{line.line}")
            for i, (_, line) in enumerate(configs)
        ]
    return [
        Comparison(name, line, analyze(line, line.release.count or 1), task.result())
        for (name, line), task in zip(configs, tasks, strict=True)
    ]


# --- presentation -------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _s(x: float) -> str:
    return f"{x:,.1f} s" if x < 100 else f"{x:,.0f} s"


def comparison_rows(results: Sequence[Comparison]) -> list[tuple[str, list[str]]]:
    """One row per figure; per config two cells, predicted then measured."""

    def pair(get_p: Callable[[Comparison], str], get_m: Callable[[Comparison], str]) -> list[str]:
        return [cell for r in results for cell in (get_p(r), get_m(r))]

    rows = [
        (
            "interval",
            pair(
                lambda r: _s(r.predicted.interval_s),
                lambda r: f"{_s(r.measured.interval_s)} ({r.interval_error:+.1%})",
            ),
        ),
        (
            "throughput / h",
            pair(
                lambda r: f"{r.predicted.throughput_per_h:.2f}",
                lambda r: f"{r.measured.throughput_per_h:.2f}",
            ),
        ),
        (
            "lead time p50",
            pair(lambda r: _s(r.predicted.lead_time_s), lambda r: _s(r.measured.lead_time_p50_s)),
        ),
        (
            "lead time p95",
            pair(lambda r: _s(r.predicted.lead_time_s), lambda r: _s(r.measured.lead_time_p95_s)),
        ),
        (
            "makespan",
            pair(lambda r: _s(r.predicted.makespan_s), lambda r: _s(r.measured.makespan_s)),
        ),
        ("bottleneck", pair(lambda r: r.predicted.bottleneck, lambda r: r.measured.bottleneck)),
        ("utilization", ["" for _ in results for _ in (0, 1)]),
    ]
    names = list(dict.fromkeys(n for r in results for n in r.line.stations))
    for name in names:
        rows.append(
            (
                f"  {name}",
                pair(
                    lambda r, n=name: (
                        _pct(r.predicted.stations[n].utilization) if n in r.line.stations else "-"
                    ),
                    lambda r, n=name: (
                        _pct(r.measured.utilization[n]) if n in r.line.stations else "-"
                    ),
                ),
            )
        )
    rows.append(
        (
            "done → next START p50 / p99",
            pair(
                lambda r: "",
                lambda r: f"{r.measured.handover_p50_ms:.1f} / {r.measured.handover_p99_ms:.1f} ms",
            ),
        )
    )
    rows.append(("wall time", pair(lambda r: "", lambda r: f"{r.measured.wall_s:.1f} s")))
    return rows


def plot(results: Sequence[Comparison], path: Path) -> None:
    """Units finished over (config) time per line, with the predicted pace dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib, an optional extra: pip install -e '.[plot]'"
        ) from exc
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        times = [t / 60 for t in r.measured.finish_times_s]
        (drawn,) = ax.step(times, range(1, len(times) + 1), where="post", label=r.line.line)
        p = r.predicted
        ax.plot(
            [p.lead_time_s / 60, p.makespan_s / 60],
            [1, p.units],
            linestyle="--",
            color=drawn.get_color(),
            label=f"{r.line.line} predicted (one every {p.interval_s / 60:g} min)",
        )
    ax.set_xlabel("time since the first release (config minutes)")
    ax.set_ylabel("units finished")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
