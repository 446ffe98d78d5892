"""Prototype and measure: run a line config against its simulators and set what it does beside
what ``analyze`` promised.

Each config runs its bundled simulators (free ports) and a real supervisor in this process, on
a throwaway SQLite trace store in a temporary directory, so the journal's commits cost what
they cost in production. ``release.count`` units are released at time 0 into an empty line.
Times are reported in line (config) seconds, as the supervisor's statistics are.

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
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linectl.analysis import Analysis, analyze, route_label
from linectl.config import Line, RouteStep, flow_stations, walk
from linectl.journal import Journal
from linectl.linestate import Condition

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
    blocked: dict[str, float] = field(default_factory=dict)  # share of the steady window
    starved: dict[str, float] = field(default_factory=dict)
    mean_wip: float = math.nan  # units in the line, time-averaged over the steady window
    quarantined: int = 0  # units quarantined during the run (released back ones too)

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "throughput_per_h": self.throughput_per_h,
            "finished": self.units,
            "lead_time_p50_s": self.lead_time_p50_s,
            "lead_time_p95_s": self.lead_time_p95_s,
            "makespan_s": self.makespan_s,
            "bottleneck": self.bottleneck,
            "stations": {
                n: {
                    "utilization": u,
                    "blocked": self.blocked.get(n, math.nan),
                    "starved": self.starved.get(n, math.nan),
                }
                for n, u in self.utilization.items()
            },
            "handover_p50_ms": self.handover_p50_ms,
            "handover_p99_ms": self.handover_p99_ms,
            "wall_s": self.wall_s,
            "cpu_share": self.cpu_share,
            "cpu_us_per_step": self.cpu_us_per_step,
            "mean_wip": self.mean_wip,
            "quarantined": self.quarantined,
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
        data["measured"] = _nulls(self.measured.to_dict())
        return data


def _nulls(value: Any) -> Any:
    """NaN (a figure the run could not measure, "n/a" in the table) as JSON null: NaN is not
    JSON, and jq and browsers refuse it."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    return value


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
    """The supervisor's clock; per station busy slot-seconds and seconds blocked and starved;
    cycles; process CPU; and the line's work in process integrated over time."""

    elapsed: float
    busy: dict[str, float]
    blocked: dict[str, float]
    starved: dict[str, float]
    cycles: int
    cpu: float
    wip_area: float
    finished: int


class Recorder:
    """Watches a running supervisor through its ``on_event`` hook (called at every change):
    marks the steady window's ends (see the module docstring), integrates WIP over time and
    keeps every finish, in line seconds since the supervisor started.

    ``units`` is how many units the run releases; None when it ends at a time instead (the
    window then ends with the run)."""

    def __init__(
        self,
        sup: Any,
        skip: int,
        units: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.sup = sup
        self.skip = skip
        self.units = units
        self.counted = units is not None  # the window ends at the last release, not the run's
        self.on_progress = on_progress
        self.start: _Mark | None = None
        self.end: _Mark | None = None
        self.finish_times: list[float] = []
        self.lead_times: list[float] = []
        self.wip_area = 0.0
        self.final: _Mark | None = None
        self.stats: Any = None  # the supervisor's statistics at close()
        self._wip = 0
        self._wip_at: float | None = None
        sup.on_event = self

    def __call__(self) -> None:
        if self.final is not None:
            return
        sup = self.sup
        wip = len(sup.units)
        if wip != self._wip or self._wip_at is None:
            # Called at every change, so integrate only when WIP changes (cheap otherwise).
            now = sup.now()
            if self._wip_at is not None:
                self.wip_area += self._wip * (now - self._wip_at)
            self._wip, self._wip_at = wip, now
        finished = sup.finished
        new = finished - len(self.finish_times)
        if new > 0:
            # The newest finishes are at the right end of the supervisor's bounded records.
            self.finish_times += list(itertools.islice(reversed(sup.finish_times), new))[::-1]
            self.lead_times += list(itertools.islice(reversed(sup.lead_times), new))[::-1]
            if self.on_progress is not None:
                self.on_progress(finished)
        if self.start is None and finished >= max(self.skip, 1):
            self.start = self.mark()
        if self.end is None and self.units is not None and sup.released >= self.units:
            self.end = self.mark() if self.start is not None else None
            self.units = None  # released all: the window's end is fixed (or the run's end)

    def close(self) -> None:
        """Take the final mark now; record nothing after (a run cut at a time drains on)."""
        if self.final is None:
            self()
            self.final = self.mark()
            self.stats = self.sup.statistics()

    def mark(self) -> _Mark:
        stats = self.sup.statistics()
        elapsed = stats.elapsed_s
        return _Mark(
            elapsed,
            {n: s.utilization * s.capacity * elapsed for n, s in stats.stations.items()},
            {n: s.seconds[Condition.BLOCKED] for n, s in stats.stations.items()},
            {n: s.seconds[Condition.STARVED] for n, s in stats.stations.items()},
            sum(s.cycles for s in stats.stations.values()),
            time.process_time(),
            self.wip_area + self._wip * (self.sup.now() - (self._wip_at or self.sup.now())),
            self.sup.finished,
        )


def figures(line: Line, rec: Recorder, *, wall_s: float) -> Measured:
    """The measured figures of a closed run (module docstring), in line seconds (the
    supervisor's statistics are in line time already)."""
    final, stats = rec.final, rec.stats
    assert final is not None, "close() the recorder first"
    scale = line.time_scale  # wall seconds per line second, for the CPU share only
    finished = len(rec.finish_times)
    if finished == 0:
        raise RuntimeError(f"line '{line.line}': no unit finished")
    first_release = min(f - lead for f, lead in zip(rec.finish_times, rec.lead_times, strict=True))
    finish = tuple(sorted(t - first_release for t in rec.finish_times))
    skip = max(0, min(rec.skip, finished - 3))
    interval = fitted_interval(finish, skip) if finished - skip >= 2 else math.nan
    start = rec.start or final
    end = rec.end if rec.end is not None and rec.end.elapsed > start.elapsed else final
    span = end.elapsed - start.elapsed
    # No steady window: too few units finished to skip the fill (rejects), the last unit was
    # released before the line filled, or nothing finished inside it. Its figures are then
    # unknown (NaN, printed "n/a"), not 0.
    never_full = rec.counted and rec.end is None
    if rec.start is None or never_full or span <= 0 or end.finished <= start.finished:
        span = 0.0

    def share(of: Callable[[_Mark], dict[str, float]], per_slot: bool = False) -> dict[str, float]:
        return {
            n: (of(end)[n] - of(start)[n]) / ((line.stations[n].capacity if per_slot else 1) * span)
            if span > 0
            else math.nan
            for n in line.stations
        }

    utilization = share(lambda m: m.busy, per_slot=True)
    steps = end.cycles - start.cycles
    leads = list(rec.lead_times)
    handovers = list(stats.handovers)
    return Measured(
        units=finished,
        interval_s=interval,
        throughput_per_h=3600 / interval if interval > 0 else math.nan,
        lead_time_p50_s=percentile(leads, 0.5),
        lead_time_p95_s=percentile(leads, 0.95),
        makespan_s=finish[-1],
        bottleneck=observed_bottleneck(line, utilization) if span > 0 else "n/a",
        utilization=utilization,
        finish_times_s=finish,
        handover_p50_ms=percentile(handovers, 0.5) * 1000,
        handover_p99_ms=percentile(handovers, 0.99) * 1000,
        wall_s=wall_s,
        cpu_share=(end.cpu - start.cpu) / (span * scale) if span > 0 else math.nan,
        cpu_us_per_step=(end.cpu - start.cpu) / steps * 1e6 if steps and span > 0 else math.nan,
        blocked=share(lambda m: m.blocked),
        starved=share(lambda m: m.starved),
        mean_wip=(end.wip_area - start.wip_area) / span if span > 0 else math.nan,
        quarantined=stats.quarantined_total,
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
                rec = Recorder(sup, skip_count(units, predicted), units, on_progress)
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
                rec.close()
    # A line with rejects is measured too: quarantined units are done, and counted.
    if sup.finished + len(sup.quarantined) < units:
        raise RuntimeError(
            f"line '{line.line}': only {sup.finished} of {units} units finished "
            f"and {len(sup.quarantined)} quarantined"
        )
    return figures(line, rec, wall_s=wall)


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
    return f"{round(x, 2) + 0.0:.0%}"  # + 0.0: a rounded -0.001 prints "0%", not "-0%"


def _s(x: float) -> str:
    return f"{x:,.1f} s" if x < 100 else f"{x:,.0f} s"


def _f2(x: float) -> str:
    return f"{x:.2f}"


def _n(x: float) -> str:
    return f"{x:,.0f}" if x == int(x) else f"{x:,.1f}"


def cell(fmt: Callable[[Any], str], value: Any) -> str:
    """A table cell; "-" for a figure the line does not have, "n/a" for one the run could not
    measure (an empty steady window, too few finished units)."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return fmt(value)


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of a predicted-beside-measured table: how to read the figure from a run and from
    ``analyze`` (None: nothing predicted), and how to print it. ``relative`` rows add the
    measured value's error against the predicted one."""

    label: str
    measured: Callable[[Measured], Any]
    fmt: Callable[[Any], str]
    predicted: Callable[[Analysis], Any] | None = None
    relative: bool = False


def figure_rows(stations: Sequence[str]) -> list[Figure | str]:
    """The measured figures in the order tables print them; a string is a heading row. A
    station a line does not have reads as None."""

    def per_station(of: Callable[[Measured], dict[str, float]], name: str) -> Callable:
        return lambda m: of(m).get(name)

    rows: list[Figure | str] = [
        Figure("interval", lambda m: m.interval_s, _s, lambda p: p.interval_s, relative=True),
        Figure("throughput / h", lambda m: m.throughput_per_h, _f2, lambda p: p.throughput_per_h),
        Figure("lead time p50", lambda m: m.lead_time_p50_s, _s, lambda p: p.lead_time_s),
        Figure("lead time p95", lambda m: m.lead_time_p95_s, _s, lambda p: p.lead_time_s),
        Figure("makespan", lambda m: m.makespan_s, _s, lambda p: p.makespan_s),
        Figure("bottleneck", lambda m: m.bottleneck, str, lambda p: p.bottleneck),
        Figure("units finished", lambda m: m.units, _n, lambda p: p.units * p.first_pass_yield),
        Figure(
            "units quarantined",
            lambda m: m.quarantined,
            _n,
            lambda p: p.units * (1 - p.first_pass_yield),
        ),
        Figure("mean WIP", lambda m: m.mean_wip, _f2),
    ]
    for heading, of in (
        ("utilization", lambda m: m.utilization),
        ("blocked", lambda m: m.blocked),
        ("starved", lambda m: m.starved),
    ):
        rows.append(heading)
        for name in stations:
            predicted = None
            if heading == "utilization":

                def predicted(p: Analysis, n: str = name) -> float | None:
                    return p.stations[n].utilization if n in p.stations else None

            rows.append(Figure(f"  {name}", per_station(of, name), _pct, predicted))
    return rows


def figure_table(
    results: Sequence[Any], measured_cell: Callable[[Figure, Any], str]
) -> list[tuple[str, list[str]]]:
    """One row per figure of ``figure_rows``; per result (each with ``line`` and
    ``predicted``) two cells: the predicted figure, then ``measured_cell(figure, result)``."""
    names = list(dict.fromkeys(n for r in results for n in r.line.stations))
    rows: list[tuple[str, list[str]]] = []
    for fig in figure_rows(names):
        if isinstance(fig, str):
            rows.append((fig, ["" for _ in results for _ in (0, 1)]))
            continue
        cells = []
        for r in results:
            cells.append(cell(fig.fmt, fig.predicted(r.predicted)) if fig.predicted else "")
            cells.append(measured_cell(fig, r))
        rows.append((fig.label, cells))
    return rows


def comparison_rows(results: Sequence[Comparison]) -> list[tuple[str, list[str]]]:
    """One row per figure; per config two cells, predicted then measured."""

    def measured_cell(fig: Figure, r: Comparison) -> str:
        measured = cell(fig.fmt, fig.measured(r.measured))
        if fig.relative and not math.isnan(r.interval_error):
            measured += f" ({round(r.interval_error, 3) + 0.0:+.1%})"
        return measured

    rows = figure_table(results, measured_cell)
    rows.append(
        (
            "done → next START p50 / p99",
            [
                c
                for r in results
                for c in (
                    "",
                    f"{r.measured.handover_p50_ms:.1f} / {r.measured.handover_p99_ms:.1f} ms",
                )
            ],
        )
    )
    rows.append(("wall time", [c for r in results for c in ("", f"{r.measured.wall_s:.1f} s")]))
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
