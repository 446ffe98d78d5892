"""The line's clock: the one place the engine reads time and schedules wake-ups.

Line time is seconds since the line started, in the line's own seconds: what the config's
cycle times, release interval and retry backoff are written in, and what statistics, metrics
and the trace report. The clock maps it onto the event loop's clock: one to one for a real
line; stretched by ``scale`` when the simulated PLCs run faster than life (``time_scale`` in a
config is for simulators: a real PLC always runs at scale 1); and in a virtual-time run the
event loop's clock itself jumps from event to event, so the same engine runs a shift in
seconds without knowing it (linectl/virtual.py).

Wall-clock time appears only where the trace store needs it, through ``wall``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime


class Clock:
    """Line time on the running event loop. ``start()`` sets line time 0."""

    def __init__(self, scale: float = 1.0, *, wall_start: datetime | None = None) -> None:
        if not scale > 0:
            raise ValueError(f"clock scale must be above 0, not {scale}")
        self.scale = scale  # loop seconds per line second
        self._wall_start = wall_start
        self._loop0 = 0.0
        self._wall0 = 0.0
        self.started = False

    def start(self) -> None:
        self._loop0 = asyncio.get_running_loop().time()
        start = self._wall_start
        self._wall0 = start.timestamp() if start is not None else time.time()
        self.started = True

    def now(self) -> float:
        """Line seconds since start (0 before it)."""
        if not self.started:
            return 0.0
        return (asyncio.get_running_loop().time() - self._loop0) / self.scale

    def of_loop(self, t: float) -> float:
        """Line time of an event-loop time (drivers stamp what they see with the loop's)."""
        return (t - self._loop0) / self.scale

    def of_wall(self, at: datetime) -> float:
        """Line time of a wall-clock time (a journalled one, read back after a restart)."""
        return (at.timestamp() - self._wall0) / self.scale

    def wall(self, t: float | None = None) -> datetime:
        """The wall-clock time of line time ``t`` (now by default), for the trace. Before
        start there is no line time yet: it is the wall clock's now."""
        if not self.started:
            return datetime.now(UTC)
        t = self.now() if t is None else t
        return datetime.fromtimestamp(self._wall0 + t * self.scale, UTC)

    def real_seconds(self, line_seconds: float) -> float:
        """How long ``line_seconds`` last on the event loop (the controller's own latency is
        measured in these)."""
        return line_seconds * self.scale

    def call_at(self, t: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        """Call ``callback`` at line time ``t``."""
        return asyncio.get_running_loop().call_at(self._loop0 + t * self.scale, callback)
