"""Flow analysis: what a line config promises before anything runs.

Pure functions of a ``Line``: no I/O, no clock. Times are the stations' nominal ``cycle_s``
(deterministic, no faults, no rejects); the arithmetic is exact (``Fraction``) and only the
result is rounded to ``float``, so a hand computation such as 2 × 1/840 = 1/420 comes out as
exactly 420.0.

How each kind of step combines, for one unit and for the steady flow of units:

===========  ====================  =================  =====================  ==================
step         rate (units/s)        lead time          first-pass yield       availability
===========  ====================  =================  =====================  ==================
station      capacity / cycle_s    cycle_s            1 - sim.reject_p       availability
sequence     min over its steps    sum                product                product
fork         min over branches     max over branches  product                product
route        see below             max over branches  traffic-weighted mean  rate-weighted mean
===========  ====================  =================  =====================  ==================

A route's branches share its traffic. A balancing policy (``round_robin``, ``least_loaded``,
``shortest_expected``) is assumed to send each branch a share proportional to the branch's
rate, which is what such a policy achieves at saturation, so the rates add. Policy
``weighted`` sends the weights' shares whatever the rates, so the route saturates when its
first branch does: rate = min(rate_i / share_i). A branch with weight 0 carries no units and
counts for nothing (not even the lead time). A route keeps running while any branch is up, at
a reduced rate: its availability is the mean of its branches' availabilities weighted by their
rates (the expected fraction of its rate).

A station with ``on_reject`` sends the share ``sim.reject_p`` of its units (the expected
reject rate) to its rework station, which then carries that share of the flow: its rate limits
the line at capacity / cycle_s / reject_p, and only the units it rejects in turn are lost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from linectl.config import ForkStep, Line, RouteStep

BALANCING = frozenset({"round_robin", "least_loaded", "shortest_expected"})

# Bottleneck names that are not a station.
BY_MAX_WIP = "max_wip"
BY_RELEASE = "release"


def route_label(path: str) -> str:
    """The bottleneck name of a route: ``route@`` and its path, e.g. ``route@flow[0]``."""
    return f"route@{path}"


@dataclass(frozen=True, slots=True)
class StationLoad:
    """One station at the line's steady throughput."""

    utilization: float  # share of the station's slot-time busy with a unit
    share: float  # share of the line's units that visit the station


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the line promises for deterministic nominal times; see ``analyze``."""

    line: str
    interval_s: float
    throughput_per_h: float
    lead_time_s: float
    makespan_s: float
    units: int
    bottleneck: str
    stations: Mapping[str, StationLoad]
    serial_fraction: float
    max_speedup: float  # math.inf when all work is inside forks
    first_pass_yield: float
    availability: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; an unbounded ``max_speedup`` becomes ``None``."""
        return {
            "line": self.line,
            "interval_s": self.interval_s,
            "throughput_per_h": self.throughput_per_h,
            "lead_time_s": self.lead_time_s,
            "makespan_s": self.makespan_s,
            "units": self.units,
            "bottleneck": self.bottleneck,
            "stations": {
                name: {"utilization": load.utilization} for name, load in self.stations.items()
            },
            "serial_fraction": self.serial_fraction,
            "max_speedup": None if math.isinf(self.max_speedup) else self.max_speedup,
            "first_pass_yield": self.first_pass_yield,
            "availability": self.availability,
        }


@dataclass(slots=True)
class _Part:
    """A step or a sequence of steps, summarised for one unit entering it."""

    rate: Fraction  # most units per second it can pass
    limit: str  # name of what sets ``rate``
    lead: Fraction  # one unit's time through it, empty
    work: Fraction  # expected sum of cycle times one unit receives
    forked: Fraction  # the part of ``work`` done inside forks
    fpy: Fraction
    availability: Fraction
    # station -> expected visits per unit entering this part
    shares: dict[str, Fraction] = field(default_factory=dict)


def _station(line: Line, name: str) -> _Part:
    st = line.stations[name]
    cycle = Fraction(st.cycle_s)
    part = _Part(
        rate=st.capacity / cycle,
        limit=name,
        lead=cycle,
        work=cycle,
        forked=Fraction(0),
        fpy=1 - Fraction(st.sim.reject_p),
        availability=Fraction(st.availability),
        shares={name: Fraction(1)},
    )
    if st.on_reject is not None and st.sim.reject_p > 0:
        # The rejected share p goes through rework and on: the rework station sees p of the
        # flow (its rate counts p times less), its own rejects are the only ones lost, and the
        # lead time of a unit through an empty line (no reject) does not change.
        p = Fraction(st.sim.reject_p)
        rework = line.stations[st.on_reject]
        r_cycle = Fraction(rework.cycle_s)
        r_rate = rework.capacity / r_cycle / p
        if r_rate < part.rate:
            part.rate, part.limit = r_rate, st.on_reject
        part.work += p * r_cycle
        part.fpy = 1 - p * Fraction(rework.sim.reject_p)
        part.shares[st.on_reject] = p
    return part


def _sequence(line: Line, steps: Sequence[Any], path: str) -> _Part:
    if not steps:
        # parse_config rejects this; a Line built in code may still hold one.
        raise ValueError(f"{path}: empty sequence of steps")
    parts = [_step(line, step, f"{path}[{i}]") for i, step in enumerate(steps)]
    # min() keeps the first of equal rates: on a tie the earliest step is named.
    slowest = min(parts, key=lambda p: p.rate)
    shares: dict[str, Fraction] = {}
    for p in parts:
        shares.update(p.shares)
    return _Part(
        rate=slowest.rate,
        limit=slowest.limit,
        lead=sum((p.lead for p in parts), Fraction(0)),
        work=sum((p.work for p in parts), Fraction(0)),
        forked=sum((p.forked for p in parts), Fraction(0)),
        fpy=math.prod((p.fpy for p in parts), start=Fraction(1)),
        availability=math.prod((p.availability for p in parts), start=Fraction(1)),
        shares=shares,
    )


def _fork(line: Line, step: ForkStep, path: str) -> _Part:
    branches = [_sequence(line, b, f"{path}.fork[{i}]") for i, b in enumerate(step.fork)]
    slowest = min(branches, key=lambda p: p.rate)
    work = sum((b.work for b in branches), Fraction(0))
    shares: dict[str, Fraction] = {}
    for b in branches:
        shares.update(b.shares)
    return _Part(
        rate=slowest.rate,
        limit=slowest.limit,
        lead=max(b.lead for b in branches),
        work=work,
        forked=work,  # every branch runs beside the others
        fpy=math.prod((b.fpy for b in branches), start=Fraction(1)),
        availability=math.prod((b.availability for b in branches), start=Fraction(1)),
        shares=shares,
    )


def _route(line: Line, step: RouteStep, path: str) -> _Part:
    route = step.route
    branches = [
        _sequence(line, b, f"{path}.route.branches[{i}]") for i, b in enumerate(route.branches)
    ]
    if route.policy in BALANCING or route.weights is None:
        total = sum((b.rate for b in branches), Fraction(0))
        shares = [b.rate / total for b in branches]
        rate, limit = total, route_label(path)
    else:
        weights = [Fraction(w) for w in route.weights]
        shares = [w / sum(weights) for w in weights]
        # The route saturates when its first branch does; that branch's own limit is the one
        # to relieve, since the weights would not send the spare work elsewhere.
        rate, limit = min(
            ((b.rate / s, b.limit) for b, s in zip(branches, shares, strict=True) if s > 0),
            key=lambda pair: pair[0],
        )
    used = [(b, s) for b, s in zip(branches, shares, strict=True) if s > 0]
    total_rate = sum((b.rate for b, _ in used), Fraction(0))
    visits: dict[str, Fraction] = {}
    for b, s in zip(branches, shares, strict=True):
        visits.update({name: v * s for name, v in b.shares.items()})
    return _Part(
        rate=rate,
        limit=limit,
        lead=max(b.lead for b, _ in used),
        work=sum((b.work * s for b, s in used), Fraction(0)),
        forked=sum((b.forked * s for b, s in used), Fraction(0)),
        fpy=sum((b.fpy * s for b, s in used), Fraction(0)),
        availability=sum((b.availability * b.rate for b, _ in used), Fraction(0)) / total_rate,
        shares=visits,
    )


def _step(line: Line, step: Any, path: str) -> _Part:
    if isinstance(step, RouteStep):
        return _route(line, step, path)
    if isinstance(step, ForkStep):
        return _fork(line, step, path)
    return _station(line, step)


def analyze(line: Line, units: int = 100) -> Analysis:
    """Predict interval, lead time, makespan and bottleneck of a line for nominal times.

    The interval between finished units is set by the slowest of: the flow (see the module
    docstring), the CONWIP cap by Little's law (throughput <= ``release.max_wip`` / lead time,
    named ``max_wip``) and the release pace (interval >= ``release.interval_s``, named
    ``release``); on a tie the flow is named. ``makespan_s`` is the pipeline estimate for
    ``units`` units released at time 0 into an empty line: the first unit takes the lead time,
    each further one adds an interval, ``lead_time + (units - 1) × interval``.

    ``bottleneck`` names what sets the interval: a station; ``route@<path>`` for a route with
    a balancing policy whose combined rate is the limit (``route@flow[0]``,
    ``route@flow[2].fork[1][0]``: the path of ``config.walk``), since no single branch is to
    blame; for a ``weighted`` route, the limit of its saturated branch; ``max_wip``; or
    ``release``. Among equal rates the earliest step in the flow is named.

    ``serial_fraction`` is the share of one unit's work (cycle times on its path, fork
    branches added up, a route's branches averaged by traffic) done outside forks, and
    ``max_speedup`` = 1 / serial_fraction is Amdahl's bound on what more parallel work inside
    the forks could gain. A station's utilization is throughput × cycle_s / capacity × the
    share of units that visit it.
    """
    if units < 1:
        raise ValueError(f"units must be >= 1, not {units}")
    flow = _sequence(line, line.flow, "flow")
    interval, bottleneck = 1 / flow.rate, flow.limit
    if line.release.max_wip is not None:
        wip_interval = flow.lead / line.release.max_wip
        if wip_interval > interval:
            interval, bottleneck = wip_interval, BY_MAX_WIP
    if line.release.interval_s is not None:
        release_interval = Fraction(line.release.interval_s)
        if release_interval > interval:
            interval, bottleneck = release_interval, BY_RELEASE
    loads = {}
    for name, st in line.stations.items():
        share = flow.shares.get(name, Fraction(0))
        busy = Fraction(st.cycle_s) / st.capacity * share / interval
        loads[name] = StationLoad(utilization=float(busy), share=float(share))
    serial = (flow.work - flow.forked) / flow.work
    return Analysis(
        line=line.line,
        interval_s=float(interval),
        throughput_per_h=float(3600 / interval),
        lead_time_s=float(flow.lead),
        makespan_s=float(flow.lead + (units - 1) * interval),
        units=units,
        bottleneck=bottleneck,
        stations=MappingProxyType(loads),
        serial_fraction=float(serial),
        max_speedup=math.inf if serial == 0 else float(1 / serial),
        first_pass_yield=float(flow.fpy),
        availability=float(flow.availability),
    )


def _duration(seconds: float) -> str:
    if seconds < 600:
        return f"{seconds:g} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{seconds:g} s ({hours}:{rest // 60:02d}:{rest % 60:02d})"


def _units(analyses: Sequence[Analysis]) -> str:
    counts = sorted({a.units for a in analyses})
    return f"{'/'.join(map(str, counts))} units"


def _speedup(bound: float) -> str:
    return "unbounded" if math.isinf(bound) else f"{bound:.2f}×"


def comparison_rows(analyses: Sequence[Analysis]) -> list[tuple[str, list[str]]]:
    """The article's comparison table, computed: one row per figure, one column per line.

    Under "utilization" come the stations: the first line's in its order, then those only later
    lines have; a line without the station shows "-".
    """
    rows: list[tuple[str, list[str]]] = [
        ("interval", [_duration(a.interval_s) for a in analyses]),
        ("throughput / h", [f"{a.throughput_per_h:.2f}" for a in analyses]),
        ("lead time", [_duration(a.lead_time_s) for a in analyses]),
        ("makespan, " + _units(analyses), [_duration(a.makespan_s) for a in analyses]),
        ("bottleneck", [a.bottleneck for a in analyses]),
        ("serial fraction", [f"{a.serial_fraction:.1%}" for a in analyses]),
        ("max speedup", [_speedup(a.max_speedup) for a in analyses]),
        ("first-pass yield", [f"{a.first_pass_yield:.1%}" for a in analyses]),
        ("availability", [f"{a.availability:.1%}" for a in analyses]),
    ]
    names = list(dict.fromkeys(name for a in analyses for name in a.stations))
    rows.append(("utilization", ["" for _ in analyses]))
    for name in names:
        cells = [
            f"{a.stations[name].utilization:.0%}" if name in a.stations else "-" for a in analyses
        ]
        rows.append((f"  {name}", cells))
    return rows
