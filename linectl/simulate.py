"""Simulate: a line run in virtual time by the real supervisor against in-process PLCs.

The same dispatcher that runs the line decides every step, so a what-if cannot disagree with
the controller because a second model drifted. The PLCs are the bundled station programs
(simulators/station.py) behind the in-process driver, with each station's ``sim:`` section
(cycle-time distribution, rejects, faults); the clock is ``linectl.virtual``'s, so a shift
takes the CPU time of its events. Simulated cycles are line seconds (``time_scale`` 1).

Figures are ``compare``'s measured column (``linectl.compare.figures``), each replication with
its own seed; tables show their mean with a 95 % confidence interval beside ``analyze``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from linectl import virtual
from linectl.analysis import Analysis, analyze
from linectl.compare import (
    Figure,
    Measured,
    Recorder,
    cell,
    figure_table,
    figures,
    skip_count,
    with_units,
)
from linectl.config import Line
from linectl.errors import LinectlError
from linectl.journal import Journal

log = logging.getLogger("linectl.simulate")
T = TypeVar("T")

# Bounds on one command: a week of line time, 100,000 units, 1,000 replications.
MAX_HOURS = 168.0
MAX_UNITS = 100_000
MAX_REPLICATIONS = 1_000
DEFAULT_UNITS = 100
DEFAULT_SEED = 1
# A virtual run that has not ended this many predicted makespans in is stuck (a flow that
# cannot finish): it is stopped with an error rather than simulated forever.
DEADLINE_FACTOR = 20.0
# "memory" as a --db: a throwaway SQLite file, on tmpfs where there is one.
MEMORY = "memory"
_TMPFS = "/dev/shm" if Path("/dev/shm").is_dir() else None


class SimulateError(LinectlError):
    """A simulation that cannot run as asked (bad arguments, a database already used)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What to simulate: ``units`` units, or ``hours`` of line time; ``replications`` runs with
    seeds ``seed``, ``seed + 1``, ...; the trace in ``db`` (None, ``MEMORY`` or a URL)."""

    units: int | None = DEFAULT_UNITS
    hours: float | None = None
    seed: int = DEFAULT_SEED
    replications: int = 1
    db: str | None = None

    def problems(self) -> list[str]:
        """One line per argument that cannot be simulated."""
        out = []
        if self.units is not None and self.hours is not None:
            out.append("give --units or --hours, not both")
        if self.units is not None and not 1 <= self.units <= MAX_UNITS:
            out.append(f"--units must be 1 to {MAX_UNITS:,}, not {self.units}")
        if self.hours is not None and not (0 < self.hours <= MAX_HOURS):
            out.append(f"--hours must be above 0 and at most {MAX_HOURS:g}, not {self.hours:g}")
        if not 1 <= self.replications <= MAX_REPLICATIONS:
            out.append(f"--replications must be 1 to {MAX_REPLICATIONS:,}, not {self.replications}")
        return out


def unsimulated(line: Line) -> list[str]:
    """Stations with no ``sim:`` section: they run at exactly their nominal ``cycle_s``."""
    return [n for n, st in line.stations.items() if "sim" not in st.model_fields_set]


def virtual_line(line: Line, plan: Plan) -> Line:
    """The line as a virtual run sees it: line seconds, and ``plan.units`` units (or no end)."""
    if plan.units is not None:
        return with_units(line, plan.units, 1.0)
    release = line.release.model_copy(update={"count": None})
    return line.model_copy(update={"time_scale": 1.0, "release": release})


def predicted(line: Line, plan: Plan) -> Analysis:
    """``analyze`` for the plan: for a time, the units it predicts finished by then."""
    if plan.units is not None:
        return analyze(line, plan.units)
    first = analyze(line, 1)
    horizon = (plan.hours or 0) * 3600
    units = math.floor((horizon - first.lead_time_s) / first.interval_s) + 1
    return analyze(line, max(units, 1))


def _driver_factory(seed: int, scripts: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    from linectl.drivers.inprocess import InProcessDriver

    def make(name: str, config: Any, stations: Any, sink: Any) -> Any:
        mine = {n: s for n, s in (scripts or {}).items() if n in stations}
        return InProcessDriver(name, config, stations, sink, seed=seed, scripts=mine)

    return make


@contextlib.asynccontextmanager
async def _store(db: str | None, line: str):
    """The trace store of one run: none, a throwaway SQLite file, or ``db`` (fresh for it)."""
    if db is None:
        yield None
        return
    from linectl.store import TraceStore
    from linectl.store.db import mask

    with contextlib.ExitStack() as stack:
        url = db
        if db == MEMORY:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="linectl-", dir=_TMPFS))
            url = f"sqlite:///{tmp}/{line}.sqlite3"
        async with await TraceStore.open(url, line) as store:
            if await store.next_unit_id() > 1:
                raise SimulateError(
                    f"trace store {mask(url)}: already holds line '{line}'; "
                    "give a fresh database for a simulation"
                )
            yield store


async def run_once(
    line: Line,
    plan: Plan,
    *,
    seed: int,
    store_line: str | None = None,
    on_supervisor: Callable[[Any], None] | None = None,
    scripts: Mapping[str, Any] | None = None,
) -> Measured:
    """One virtual run of ``line`` (as given: see ``virtual_line``); call it on a
    ``linectl.virtual`` loop. ``on_supervisor(sup)`` sees the supervisor before it starts;
    ``scripts`` (station -> cycles) replay recorded cycles (``InProcessDriver``)."""
    from linectl.supervisor import Supervisor

    loop = asyncio.get_running_loop()
    expected = predicted(line, plan)
    units = plan.units
    horizon = plan.hours * 3600 if plan.hours is not None else None
    # The longest a unit can take, at worst: every step retried with the longest backoff.
    worst_lead = expected.lead_time_s * line.retry.attempts + line.retry.backoff_max_s * len(
        line.stations
    )
    deadline = (
        horizon + worst_lead if horizon is not None else expected.makespan_s * DEADLINE_FACTOR
    )
    wall = time.perf_counter()
    async with _store(plan.db, store_line or line.line) as store:
        sup = Supervisor(
            line,
            journal=Journal(store),
            driver_factory=_driver_factory(seed, scripts),
            exit_when_done=units is not None,
            drain_timeout_s=worst_lead,
        )
        rec = Recorder(sup, skip_count(expected.units, expected), units)
        if on_supervisor is not None:
            on_supervisor(sup)
        if horizon is not None:

            def end_of_run() -> None:
                rec.close()
                sup.stop()

            loop.call_at(loop.time() + horizon, end_of_run)
        try:
            async with asyncio.timeout(deadline):
                await sup.run()
        except TimeoutError:
            raise SimulateError(
                f"line '{line.line}': {sup.finished} of {units} units finished in "
                f"{deadline:,.0f} s of line time; the flow cannot finish them"
            ) from None
        rec.close()
    return figures(line, rec, wall_s=time.perf_counter() - wall)


@dataclass(frozen=True, slots=True)
class Simulation:
    """Every replication of one config, beside what ``analyze`` predicts."""

    config: str
    line: Line
    plan: Plan
    predicted: Analysis
    runs: tuple[Measured, ...]
    unsimulated: tuple[str, ...]

    @property
    def seeds(self) -> list[int]:
        return [self.plan.seed + i for i in range(len(self.runs))]

    def to_dict(self) -> dict[str, Any]:
        """``analyze --json``'s keys, ``simulated``: mean and 95 % half-width of each figure,
        and ``runs``: every replication's figures (finish times left out)."""
        data = self.predicted.to_dict()
        data["config"] = self.config
        data["replications"] = len(self.runs)
        data["seeds"] = self.seeds
        data["units"] = self.plan.units
        data["hours"] = self.plan.hours
        runs = [_plain(m) for m in self.runs]
        data["simulated"] = _aggregate(runs)
        data["runs"] = runs
        return data


def _plain(m: Measured) -> dict[str, Any]:
    data = m.to_dict()
    for key in ("handover_p50_ms", "handover_p99_ms", "cpu_share"):
        data.pop(key, None)  # a virtual handover takes no time; CPU share is one core
    data["units"] = m.units
    return data


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per numeric figure (nested as in the runs) its mean and 95 % half-width; per text
    figure the most common value."""
    first = runs[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [r[key] for r in runs]
        if isinstance(value, dict):
            out[key] = _aggregate(values)
        elif isinstance(value, str):
            out[key] = Counter(values).most_common(1)[0][0]
        else:
            mean, half = mean_ci(values)
            out[key] = {"mean": mean, "ci95": half}
    return out


# Student's t, two-sided 95 %, by degrees of freedom (1..30); 1.96 beyond.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % confidence interval (Student's t); None for one
    value. Values that could not be measured (NaN) are left out."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return math.nan, None
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, None
    t = _T95[len(xs) - 2] if len(xs) - 1 <= len(_T95) else 1.96
    return mean, t * statistics.stdev(xs) / math.sqrt(len(xs))


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` (``simulate``, ``run_once``...) on a new virtual-time loop."""
    return virtual.run(main)


async def simulate(
    configs: Sequence[tuple[str, Line]],
    plan: Plan,
    *,
    on_run: Callable[[int, int], None] | None = None,
) -> list[Simulation]:
    """Every replication of every config, one after the other; call on a virtual loop.
    ``on_run(config index, replications done)`` reports progress."""
    problems = plan.problems()
    if problems:
        raise SimulateError("; ".join(problems))
    out = []
    for i, (name, line) in enumerate(configs):
        vline = virtual_line(line, plan)
        runs = []
        for r in range(plan.replications):
            store_line = line.line if plan.replications == 1 else f"{line.line}-r{r + 1}"
            runs.append(await run_once(vline, plan, seed=plan.seed + r, store_line=store_line))
            if on_run is not None:
                on_run(i, r + 1)
        out.append(
            Simulation(
                name, line, plan, predicted(vline, plan), tuple(runs), tuple(unsimulated(line))
            )
        )
    return out


# --- presentation -------------------------------------------------------------------------------


def _with_ci(fig: Figure, runs: Sequence[Measured]) -> str:
    values = [fig.measured(m) for m in runs]
    if any(v is None for v in values):
        return "-"
    if isinstance(values[0], str):
        common, count = Counter(values).most_common(1)[0]
        return common if count == len(values) else f"{common} ({count}/{len(values)})"
    mean, half = mean_ci(values)
    text = cell(fig.fmt, mean)
    return text if half is None else f"{text} ± {cell(fig.fmt, half)}"


def simulation_rows(results: Sequence[Simulation]) -> list[tuple[str, list[str]]]:
    """One row per figure; per config two cells, predicted then simulated (mean ± 95 % CI)."""

    def simulated_cell(fig: Figure, r: Simulation) -> str:
        simulated = _with_ci(fig, r.runs)
        if fig.relative and fig.predicted is not None:
            mean, _ = mean_ci([fig.measured(m) for m in r.runs])
            simulated += f" ({mean / fig.predicted(r.predicted) - 1:+.1%})"
        return simulated

    rows = figure_table(results, simulated_cell)
    rows.append(
        ("wall time", [c for r in results for c in ("", f"{sum(m.wall_s for m in r.runs):.2f} s")])
    )
    return rows
