"""The line's active constraint, measured while it runs: the blocked/starved method.

A station that is neither blocked nor starved is *active* (working, or down: a fault or a lost
PLC holds the line up just as much). Over a sliding window, the station with the largest
active share is the one the others wait for: the constraint (Roser, Nakano and Tanaka's
active-period idea, on the time per condition the dispatcher already keeps). Out-of-service
time counts as inactive, so a station the operator took out is never blamed.

When two stations are close (within ``margin`` of the leader's active share) neither clearly
limits the line: the bottleneck *shifts* between them. Then the constraint named so far stays
named, and the close ones are reported as ``shifting``; the constraint *moves* only when another
station leads it by more than the margin. That keeps one noisy minute from flapping the metric,
the log and the trace.

``ConstraintTracker`` is pure (samples in, verdict out); ``ConstraintMonitor`` samples a running
supervisor's ``statistics()`` and reports moves (log line, trace record, counter).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

log = logging.getLogger("linectl.bottleneck")

# Conditions (linestate.Condition values) in which a station waits on others or is taken out.
INACTIVE = ("blocked", "starved", "out_of_service")
# Below this active share nothing is working enough to constrain anything (an idle line).
MIN_ACTIVE = 0.02
MAX_SAMPLES = 4096  # bounds the window's memory whatever window and period are chosen


@dataclass(frozen=True, slots=True)
class Constraint:
    """The verdict over one window."""

    station: str | None  # the active constraint; None while nothing runs enough to judge
    shifting: tuple[str, ...]  # stations within the margin of the leader, leader first ((): none)
    active: Mapping[str, float] = field(default_factory=dict)  # station -> active share
    window_s: float = 0.0  # the time the window actually covers

    @property
    def is_shifting(self) -> bool:
        return len(self.shifting) > 1


NO_CONSTRAINT = Constraint(None, ())


def active_shares(
    old: Mapping[str, Mapping[str, float]], new: Mapping[str, Mapping[str, float]]
) -> tuple[dict[str, float], float]:
    """Each station's active share between two samples of cumulative seconds per condition,
    and the longest time any station was observed in between."""
    shares: dict[str, float] = {}
    span = 0.0
    for name, now in new.items():
        before = old.get(name, {})
        spent = {c: now[c] - before.get(c, 0.0) for c in now}
        total = sum(spent.values())
        span = max(span, total)
        if total > 0:
            inactive = sum(spent.get(c, 0.0) for c in INACTIVE)
            shares[name] = max(0.0, min(1.0, 1.0 - inactive / total))
    return shares, span


def judge(
    shares: Mapping[str, float], current: str | None, margin: float
) -> tuple[str | None, tuple[str, ...]]:
    """The constraint given active shares and the one named so far (the shifting-bottleneck
    rule: keep ``current`` while it is within ``margin`` of the leader)."""
    ranked = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    if not ranked or ranked[0][1] < MIN_ACTIVE:
        return None, ()
    lead = ranked[0][1]
    close = tuple(name for name, share in ranked if lead - share <= margin)
    if current in close:
        station = current
        close = (current, *(n for n in close if n != current))
    else:
        station = close[0]
    return station, close if len(close) > 1 else ()


class ConstraintTracker:
    """Samples of cumulative seconds per condition in, the constraint over the window out."""

    def __init__(self, window_s: float, margin: float = 0.05) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), not {margin}")
        self.window_s = window_s
        self.margin = margin
        self.current = NO_CONSTRAINT
        self.moves = 0  # times the constraint moved from one station to another
        self._samples: deque[tuple[float, dict[str, dict[str, float]]]] = deque(maxlen=MAX_SAMPLES)

    def observe(self, at: float, seconds: Mapping[str, Mapping[str, float]]) -> Constraint:
        """Add a sample taken at ``at`` (any clock, same for every sample) and judge the
        window that ends there. ``seconds``: station -> condition value -> cumulative seconds."""
        self._samples.append((at, {n: dict(s) for n, s in seconds.items()}))
        # Keep one sample at or before the window's start, so the window is covered in full.
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.window_s:
            self._samples.popleft()
        if len(self._samples) < 2:
            return self.current
        shares, span = active_shares(self._samples[0][1], self._samples[-1][1])
        station, shifting = judge(shares, self.current.station, self.margin)
        if station is None and self.current.station is not None:
            station = self.current.station  # an idle spell says nothing new about the line
            shifting = ()
        moved = None not in (station, self.current.station) and station != self.current.station
        if moved:
            self.moves += 1
        self.current = Constraint(station, shifting, MappingProxyType(shares), span)
        return self.current


def _seconds(stats: Any) -> dict[str, dict[str, float]]:
    return {
        name: {str(c.value if hasattr(c, "value") else c): v for c, v in st.seconds.items()}
        for name, st in stats.stations.items()
    }


class ConstraintMonitor:
    """Samples a running supervisor every ``period_s`` and names its constraint.

    A move is logged once ("constraint moved from a to b"), recorded in the trace store as a
    ``constraint_moved`` station event of the new constraint, and counted (``moves``).
    ``window_s`` and ``period_s`` are in line (config) seconds: the simulators' ``time_scale``
    stretches them like the cycle times, so a sped-up demo judges the same stretch of its work.
    """

    def __init__(
        self,
        sup: Any,
        *,
        window_s: float = 600.0,
        margin: float = 0.05,
        period_s: float = 5.0,
        on_move: Callable[[str | None, Constraint], None] | None = None,
    ) -> None:
        scale = sup.line.time_scale
        self.sup = sup
        self.period_s = period_s * scale
        # Statistics are in line time already; only the sampling sleep is on the loop's clock.
        self.tracker = ConstraintTracker(window_s, margin)
        self.on_move = on_move

    @property
    def current(self) -> Constraint:
        return self.tracker.current

    @property
    def moves(self) -> int:
        return self.tracker.moves

    def sample(self) -> Constraint:
        """Take one sample now (on the supervisor's loop) and report a move."""
        stats = self.sup.statistics()
        before = self.tracker.current.station
        moves = self.tracker.moves
        now = self.tracker.observe(stats.elapsed_s, _seconds(stats))
        if self.tracker.moves != moves:
            self._moved(before, now)
        return now

    def _moved(self, before: str | None, now: Constraint) -> None:
        assert now.station is not None
        share = now.active.get(now.station, 0.0)
        detail = f"from {before} (active {now.active.get(before or '', 0.0):.0%}) to {now.station}"
        log.info("constraint moved %s (active %.0f%%)", detail, share * 100)
        self.sup.journal.station_event(
            now.station, "constraint_moved", self.sup.wall(), None, detail
        )
        if self.on_move is not None:
            self.on_move(before, now)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.period_s)
