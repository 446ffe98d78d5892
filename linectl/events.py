"""What happens on the line, as a stream of frozen events for whoever watches it.

The dispatcher publishes; the northbound OPC UA server, MQTT, the live line view and anything
else subscribe. Publishing never blocks and never fails: each subscriber has a bounded queue
that drops its oldest event when full, counts what it dropped and says so once per episode,
so a slow broker or a stalled browser can never slow a handover.

Station events are coalesced per dispatch pass (one per station whose picture changed: one that
would repeat the station's last event but for its time is not published), unit events are one
per transition, and a ``LineChanged`` follows any pass that changed the line's counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime

log = logging.getLogger("linectl.events")

DEFAULT_MAXSIZE = 1_000
MAX_SUBSCRIBERS = 64


@dataclass(frozen=True, slots=True)
class StationChanged:
    station: str
    condition: str  # linestate.Condition value: working, blocked, starved, faulted, ...
    state: int  # PackML state code of slot 0
    state_name: str
    units: tuple[str, ...]  # serials of the units in its slots
    load: int
    capacity: int
    in_service: bool
    connected: bool
    cycles: int
    passed: int
    rejected: int
    faults: int
    at: float  # line time: seconds since the supervisor started
    wall: datetime


@dataclass(frozen=True, slots=True)
class UnitChanged:
    kind: str  # released | finished | quarantined | quarantine_released
    unit_id: int
    serial: str
    station: str  # where it happened, when there is one place ("" otherwise)
    reason: str
    at: float
    wall: datetime


@dataclass(frozen=True, slots=True)
class LineChanged:
    released: int
    finished: int
    quarantined: int
    wip: int
    paused: bool
    at: float
    wall: datetime


LineEvent = StationChanged | UnitChanged | LineChanged


class Subscription:
    """One subscriber's bounded queue of events (drop-oldest)."""

    def __init__(self, hub: EventHub, name: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"event subscription '{name}': maxsize must be at least 1")
        self.name = name
        self.maxsize = maxsize
        self.dropped = 0  # events dropped because this subscriber fell behind
        self._hub = hub
        self._items: deque[LineEvent] = deque()
        self._ready = asyncio.Event()
        self._dropping = False

    def put(self, event: LineEvent) -> None:
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "event subscriber '%s' is behind by %d events: dropping the oldest",
                    self.name,
                    self.maxsize,
                )
        self._items.append(event)
        self._ready.set()

    def get_nowait(self) -> LineEvent:
        """The oldest queued event; raises asyncio.QueueEmpty when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        event = self._items.popleft()
        if not self._items:
            self._ready.clear()
            if self._dropping:
                self._dropping = False
                log.info("event subscriber '%s' caught up (%d dropped)", self.name, self.dropped)
        return event

    async def get(self) -> LineEvent:
        while not self._items:
            await self._ready.wait()
        return self.get_nowait()

    def drain(self) -> list[LineEvent]:
        """Every queued event, oldest first (for consumers that coalesce)."""
        events = list(self._items)
        self._items.clear()
        self._ready.clear()
        self._dropping = False
        return events

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        self._hub._subscribers.pop(id(self), None)


class EventHub:
    """Fan-out of line events to bounded subscriptions."""

    def __init__(self) -> None:
        self._subscribers: dict[int, Subscription] = {}

    @property
    def active(self) -> bool:
        """Whether anyone listens (publishers skip building events when nobody does)."""
        return bool(self._subscribers)

    def subscribe(self, name: str = "", maxsize: int = DEFAULT_MAXSIZE) -> Subscription:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise RuntimeError(f"too many event subscribers (limit {MAX_SUBSCRIBERS})")
        sub = Subscription(self, name or f"subscriber-{len(self._subscribers) + 1}", maxsize)
        self._subscribers[id(sub)] = sub
        return sub

    def publish(self, event: LineEvent) -> None:
        for sub in list(self._subscribers.values()):
            sub.put(event)

    def dropped(self) -> dict[str, int]:
        """Events dropped so far, per subscriber name."""
        out: dict[str, int] = {}
        for sub in self._subscribers.values():
            out[sub.name] = out.get(sub.name, 0) + sub.dropped
        return out
