"""Forecast: how many units will a running line have finished by the end of the shift?

A snapshot of the live supervisor (the units in the line and where their tokens stand, the
cycles in progress and how long they have run, the release plan, what the operator paused or
took out of service) is put into virtual runs of the same line (linectl/simulate.py). The
virtual supervisor starts from it the way a restarted supervisor starts from its journal
(``Supervisor._recover``): the snapshot is served as a trace store holding the open units,
with steps that put each token where it stands. The in-process PLCs finish the cycles in
progress after their remaining time, drawn from each station's distribution given the time
already spent. Each replication has its own seed; the answer is the distribution of the units
finished by then.

The runs take CPU, so a live controller runs them in a child process (``forecast_async``):
the dispatch loop keeps its core, and a run that overstays its deadline is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import pickle
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from linectl.config import Line, Station
from linectl.contract import Command, Result
from linectl.errors import LinectlError
from linectl.flow import CompiledFlow, ForkNode, Node, RouteNode, Seq, StationNode
from linectl.journal import Journal
from linectl.linestate import Phase, Token, Unit

log = logging.getLogger("linectl.forecast")

DEFAULT_REPLICATIONS = 10
MAX_REPLICATIONS = 100
# The work one forecast may ask for: line hours x replications (a demo line hour is ~0.1 s).
MAX_LINE_HOURS = 500.0
TIMEOUT_S = 120.0
MAX_RESULT_BYTES = 1_000_000


class ForecastError(LinectlError):
    """A forecast that cannot be made as asked."""


class ForecastFailed(ForecastError):
    """A forecast that was asked for properly but did not come back (deadline, crash)."""


# --- the snapshot ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapStep:
    """A step as recovery reads it from the journal (``recovery.StepLike``)."""

    station: str
    slot: int
    attempt: int
    seq: int
    status: str  # commanded (open) or finished
    result: str | None
    commanded_at: datetime


@dataclass(frozen=True, slots=True)
class SnapUnit:
    """A unit in the line; ``age_s`` line seconds since its release."""

    unit_id: int
    serial: str
    age_s: float
    steps: tuple[SnapStep, ...]


@dataclass(frozen=True, slots=True)
class InProgress:
    """A cycle a PLC is running: ``elapsed_s`` line seconds since it started."""

    station: str
    slot: int
    seq: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a virtual run needs of a live line, in line seconds. Plain data (picklable)."""

    line: Line
    taken_at: datetime
    finished: int
    next_unit_id: int
    paused: bool
    out_of_service: frozenset[str]
    units: tuple[SnapUnit, ...]
    in_progress: tuple[InProgress, ...]


@dataclass(frozen=True, slots=True)
class _Pos:
    """Where a live token stands: ``kind`` open / pass / fault at a station, or before
    ``node`` (waiting to enter it)."""

    kind: str
    node: Node
    token: Token


def _position(flow: CompiledFlow, tok: Token) -> _Pos | None:
    if tok.slot is not None and tok.phase in (Phase.COMMANDED, Phase.RUNNING):
        return _Pos("open", flow.stations[tok.station], tok)
    if tok.slot is not None:
        return _Pos("pass", flow.stations[tok.station], tok)
    if tok.target is None:
        return None
    if tok.station and tok.attempt:
        node = flow.stations[tok.station]
        route = flow.route_of(tok.station)
        if tok.target is node or (route is not None and tok.target is route[0]):
            return _Pos("fault", node, tok)  # to be tried again after a fault
    return _Pos("before", tok.target, tok)


def _ancestors(node: Node) -> set[int]:
    """ids of ``node`` and every node and sequence above it."""
    out = {id(node)}
    seq: Seq | None = node.parent
    while seq is not None:
        out.add(id(seq))
        owner = seq.owner
        if owner is None:
            break
        out.add(id(owner))
        seq = owner.parent
    return out


class _Steps:
    """Journal steps that, replayed through the flow (``recovery.replay``), put a unit's tokens
    where the live tokens stand: every step before them passed, theirs open, passed (done,
    holding the slot) or faulted (to be tried again)."""

    def __init__(self, unit: Unit, positions: list[_Pos], at: datetime) -> None:
        self.unit = unit
        self.at = at
        self.positions = [(p, _ancestors(p.node)) for p in positions]

    def _step(
        self, station: str, slot: int, attempt: int, seq: int, result: str | None
    ) -> SnapStep:
        status = "commanded" if result is None else "finished"
        return SnapStep(station, slot, attempt, seq, status, result, self.at)

    def passed(self, node: Node) -> Iterator[SnapStep]:
        """A node the unit is through."""
        if isinstance(node, StationNode):
            attempt = self.unit.attempts.get(node.station, 1)
            yield self._step(node.station, 0, attempt, 0, "pass")
        elif isinstance(node, RouteNode):
            yield from self.sequence(node.branches[self.unit.branches.get(node.path, 0)], [])
        elif isinstance(node, ForkNode):
            for branch in node.branches:
                yield from self.sequence(branch, [])

    def sequence(self, seq: Seq, inside: list[tuple[_Pos, set[int]]]) -> Iterator[SnapStep]:
        """The steps of a sequence up to the node holding tokens (all of it, with none)."""
        for node in seq.steps:
            here = [(p, a) for p, a in inside if id(node) in a]
            if here:
                yield from self.node(node, here)
                return
            yield from self.passed(node)

    def node(self, node: Node, inside: list[tuple[_Pos, set[int]]]) -> Iterator[SnapStep]:
        if any(p.kind == "before" and p.node is node for p, _ in inside):
            return  # waiting to enter it
        if isinstance(node, StationNode):
            p = inside[0][0]
            tok = p.token
            slot = tok.slot.index if tok.slot is not None else 0
            result = {"open": None, "pass": "pass", "fault": "fault"}[p.kind]
            yield self._step(node.station, slot, tok.attempt, tok.seq, result)
        elif isinstance(node, RouteNode):
            for branch in node.branches:
                if any(id(branch) in a for _, a in inside):
                    yield from self.sequence(branch, inside)
        elif isinstance(node, ForkNode):
            for branch in node.branches:
                mine = [(p, a) for p, a in inside if id(branch) in a]
                # A branch with no token is done: its token went on into the join.
                yield from self.sequence(branch, mine)

    def all(self) -> tuple[SnapStep, ...]:
        return tuple(self.sequence(self._root(), self.positions))

    def _root(self) -> Seq:
        node = self.positions[0][0].node
        seq = node.parent
        while seq is not None and seq.owner is not None:
            seq = seq.owner.parent
        assert seq is not None
        return seq


def snapshot(sup: Any) -> Snapshot:
    """The live state of a running supervisor (its public surface), in line seconds."""
    now = sup.now()  # line time, as every time the supervisor keeps
    taken_at = datetime.now(UTC)
    units = []
    for unit in sorted(sup.units.values(), key=lambda u: u.id):
        positions = [p for t in unit.tokens if (p := _position(sup.flow, t)) is not None]
        steps = _Steps(unit, positions, taken_at).all() if positions else ()
        units.append(SnapUnit(unit.id, unit.serial, now - unit.released_at, steps))
    running = []
    for st in sup.stations.values():
        for slot in st.slots:
            tok = slot.occupant
            if tok is None or tok.phase not in (Phase.COMMANDED, Phase.RUNNING):
                continue
            since = slot.executing_since
            elapsed = now - since if since is not None else 0.0
            running.append(InProgress(st.name, slot.index, tok.seq, max(elapsed, 0.0)))
    return Snapshot(
        line=sup.line,
        taken_at=taken_at,
        finished=sup.statistics().finished,
        next_unit_id=sup.next_unit_id,
        paused=sup.paused,
        out_of_service=frozenset(n for n, st in sup.stations.items() if not st.in_service),
        units=tuple(units),
        in_progress=tuple(running),
    )


# --- virtual runs from a snapshot -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _OperatorState:
    paused: bool
    out_of_service: frozenset[str]


@dataclass(frozen=True, slots=True)
class _OpenUnit:
    """A unit record as ``Supervisor._recover`` reads it."""

    unit_id: int
    serial: str
    status: str
    released_at: datetime
    reason: str | None
    steps: tuple[SnapStep, ...]
    releases: tuple[datetime, ...] = ()


class _SnapshotStore:
    """The trace store a virtual supervisor starts from: the snapshot's open units and operator
    state; everything it writes goes nowhere."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    async def next_unit_id(self) -> int:
        return self.snap.next_unit_id

    async def operator_state(self) -> _OperatorState:
        return _OperatorState(self.snap.paused, self.snap.out_of_service)

    async def open_units(self) -> list[_OpenUnit]:
        now = datetime.now(UTC)
        return [
            _OpenUnit(
                u.unit_id, u.serial, "in_line", now - timedelta(seconds=u.age_s), None, u.steps
            )
            for u in self.snap.units
        ]

    def row(self, kind: str, *args: Any) -> None:
        return None

    def put_rows(self, rows: list[Any]) -> None:
        pass

    async def flush(self) -> None:
        return None


def residual_cycle(station: Station, elapsed_s: float, rng: random.Random) -> tuple[float, int]:
    """The rest of a cycle that has run ``elapsed_s``: a cycle time drawn from the station's
    distribution given that it is longer (0 if none of 100 draws is), and its result."""
    from simulators.station import sample_cycle

    spec = station.sim
    remaining = 0.0
    for _ in range(1 if spec.distribution == "fixed" or not spec.spread else 100):
        drawn = sample_cycle(spec, station.cycle_s, rng)
        if drawn > elapsed_s:
            remaining = drawn - elapsed_s
            break
    rejected = bool(spec.reject_p) and rng.random() < spec.reject_p
    return remaining, int(Result.REJECT if rejected else Result.PASS)


def _driver_factory(seed: int, residual: dict[tuple[str, int, int], tuple[float, int]]) -> Any:
    from linectl.drivers.inprocess import InProcessDriver, ScriptedCycle

    class Resuming(InProcessDriver):
        """Runs the START that resumes a cycle in progress for the rest of that cycle."""

        async def command(self, station: str, slot: int, seq: int, code: Command, unit: int):
            rest = residual.pop((station, slot, seq), None) if code == Command.START else None
            if rest is not None:
                self.plc.stations[station].script = iter([ScriptedCycle(rest[0], Result(rest[1]))])
            return await super().command(station, slot, seq, code, unit)

    def make(name: str, config: Any, stations: Any, sink: Any) -> Any:
        return Resuming(name, config, stations, sink, seed=seed)

    return make


async def finished_by(snap: Snapshot, horizon_s: float, seed: int) -> int:
    """One virtual run from ``snap``: units finished ``horizon_s`` line seconds on, counting
    those finished before the snapshot. Call on a ``linectl.virtual`` loop."""
    from linectl.supervisor import Supervisor

    line = snap.line.model_copy(update={"time_scale": 1.0})
    rng = random.Random(f"forecast:{seed}")
    residual = {
        (p.station, p.slot, p.seq): residual_cycle(line.stations[p.station], p.elapsed_s, rng)
        for p in snap.in_progress
    }
    sup = Supervisor(
        line,
        journal=Journal(_SnapshotStore(snap)),
        driver_factory=_driver_factory(seed, residual),
        drain_timeout_s=0.0,
    )
    counted: list[int] = []

    def horizon() -> None:
        counted.append(sup.finished)
        sup.stop()

    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + horizon_s, horizon)
    await sup.run()
    return snap.finished + counted[0]


# --- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forecast:
    """Units finished by ``until`` (wall), per replication, counting those finished already."""

    line: str
    taken_at: datetime
    until: datetime
    horizon_s: float  # line seconds from the snapshot to ``until``
    finished_now: int
    in_line: int
    seeds: tuple[int, ...]
    runs: tuple[int, ...] = field(default=())

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile of ``runs``."""
        ordered = sorted(self.runs)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "taken_at": self.taken_at.isoformat(),
            "until": self.until.isoformat(),
            "horizon_s": self.horizon_s,
            "finished_now": self.finished_now,
            "in_line": self.in_line,
            "replications": len(self.runs),
            "seeds": list(self.seeds),
            "finished_by_until": {
                "mean": sum(self.runs) / len(self.runs),
                "p5": self.quantile(0.05),
                "p50": self.quantile(0.5),
                "p95": self.quantile(0.95),
                "min": min(self.runs),
                "max": max(self.runs),
                "runs": list(self.runs),
            },
        }


def horizon_of(snap: Snapshot, until: datetime) -> float:
    """Line seconds from the snapshot to ``until``; a problem is a ForecastError."""
    wall = (until - snap.taken_at).total_seconds()
    if wall <= 0:
        raise ForecastError(f"until {until.isoformat()} is not after now")
    return wall / snap.line.time_scale


def check(snap: Snapshot, until: datetime, replications: int) -> float:
    """The horizon in line seconds, once the request is known to be bounded."""
    if not 1 <= replications <= MAX_REPLICATIONS:
        raise ForecastError(f"replications must be 1 to {MAX_REPLICATIONS}, not {replications}")
    horizon = horizon_of(snap, until)
    work = horizon / 3600 * replications
    if work > MAX_LINE_HOURS:
        raise ForecastError(
            f"{replications} replications of {horizon / 3600:.1f} line hours is more than "
            f"{MAX_LINE_HOURS:g} line hours of simulation; ask for fewer replications or an "
            "earlier time"
        )
    return horizon


def forecast(snap: Snapshot, until: datetime, replications: int, seed: int = 1) -> Forecast:
    """Every replication, in this process (on new virtual-time loops)."""
    from linectl import virtual

    horizon = check(snap, until, replications)
    seeds = tuple(seed + i for i in range(replications))

    async def runs() -> list[int]:
        return [await finished_by(snap, horizon, s) for s in seeds]

    counts = virtual.run(runs())
    return Forecast(
        snap.line.line,
        snap.taken_at,
        until,
        horizon,
        snap.finished,
        len(snap.units),
        seeds,
        tuple(counts),
    )


async def forecast_async(
    snap: Snapshot, until: datetime, replications: int, seed: int = 1, timeout_s: float = TIMEOUT_S
) -> Forecast:
    """``forecast`` in a child process, so a live controller keeps its core; killed after
    ``timeout_s``."""
    check(snap, until, replications)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        # Not ``-m linectl.forecast``: its classes would pickle as __main__'s.
        "from linectl.forecast import child; child()",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(pickle.dumps((snap, until, replications, seed)))
    except TimeoutError:
        raise ForecastFailed(f"forecast took longer than {timeout_s:g} s; stopped") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
    if proc.returncode != 0 or len(out) > MAX_RESULT_BYTES:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ForecastFailed(f"forecast failed: {last[0]}")
    result = pickle.loads(out)  # our own child's answer
    if isinstance(result, str):
        raise ForecastError(result)
    return result


def child() -> None:
    """The child process of ``forecast_async``: a pickled request on stdin, the Forecast on
    stdout (a ForecastError's message as a string)."""
    logging.basicConfig(level=logging.ERROR)
    snap, until, replications, seed = pickle.loads(sys.stdin.buffer.read())
    try:
        result: Any = forecast(snap, until, replications, seed)
    except ForecastError as exc:
        result = str(exc)
    sys.stdout.buffer.write(pickle.dumps(result))

