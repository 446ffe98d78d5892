"""The supervisor's ordered record of what happened, written to the trace store if there is one.

The dispatcher calls these methods from plain (non-async) code, so each write is appended to an
in-order queue that one task hands to the store. Two things wait for durability: a step's
write-ahead intent (before its START) and a RESET (before the PLC forgets a unit's result).
Everything waiting at the same moment shares one commit.

The queue needs no capacity of its own: every entry belongs to a step, and steps are throttled
by the awaited intents, so the queue can only grow as fast as the store commits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime
from typing import Any, Protocol


class Store(Protocol):  # what the journal needs of linectl.store.TraceStore
    async def next_unit_id(self) -> int: ...
    async def flush(self) -> None: ...


class Journal:
    """In-order writes to ``store``; with no store it records nothing and costs nothing."""

    def __init__(self, store: Any | None = None) -> None:
        self.store = store
        self._queue: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._queued = 0  # writes ever queued
        self._committed = 0  # writes known durable
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (write number, future)
        self._wake = asyncio.Event()
        self._failed: BaseException | None = None

    async def next_unit_id(self) -> int:
        return await self.store.next_unit_id() if self.store is not None else 1

    def _put(self, kind: str, *args: Any) -> None:
        if self.store is None:
            return
        if self._failed is not None:
            raise self._failed
        self._queue.append((kind, args))
        self._queued += 1
        self._wake.set()

    async def run(self) -> None:
        """Hand queued writes to the store, in order, until cancelled (with no store there
        is nothing to hand over, and it returns at once)."""
        if self.store is None:
            return
        handed = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while self._queue:
                    kind, args = self._queue.popleft()
                    await getattr(self.store, kind)(*args)
                    handed += 1
                if self._waiters:
                    # One commit makes every write handed over so far durable: intents and
                    # syncs that arrived meanwhile share it.
                    await self.store.flush()
                    self._committed = handed
            except Exception as exc:  # a store failure must reach every waiter, not vanish
                self._failed = exc
                for _, fut in self._waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                raise
            still = []
            for number, fut in self._waiters:
                if number <= self._committed:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((number, fut))
            self._waiters = still
            if still:
                self._wake.set()

    async def sync(self) -> None:
        """Return once every write queued so far is durable (needs ``run`` going)."""
        if self.store is None or self._committed >= self._queued:
            return
        if self._failed is not None:
            raise self._failed
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, fut))
        self._wake.set()
        await fut

    async def flush(self) -> None:
        """Wait until everything journalled so far is committed."""
        if self.store is None:
            return
        # Not "anything queued": the writer task pops a write before handing it to the store,
        # so a write can be in neither queue and still not be the store's yet.
        await self.sync()
        await self.store.flush()

    # --- the writes -----------------------------------------------------------------------

    def unit_released(self, unit_id: int, serial: str, at: datetime) -> None:
        self._put("unit_released", unit_id, serial, at)

    async def step_commanded(
        self,
        unit_id: int,
        station: str,
        slot: int,
        attempt: int,
        seq: int,
        at: datetime,
        branch: str | None = None,
    ) -> None:
        """Record the intent to run a step; returns once it is durable."""
        if self.store is None:
            return
        self._put("step_intended", unit_id, station, slot, attempt, seq, at, branch or None)
        await self.sync()

    def step_accepted(self, unit_id: int, station: str, attempt: int, at: datetime) -> None:
        self._put("step_accepted", unit_id, station, attempt, at)

    def step_finished(
        self,
        unit_id: int,
        station: str,
        attempt: int,
        at: datetime,
        result: str,
        fault_code: int = 0,
        plc_cycle_s: float | None = None,
    ) -> None:
        self._put("step_finished", unit_id, station, attempt, at, result, fault_code, plc_cycle_s)

    def unit_finished(self, unit_id: int, at: datetime) -> None:
        self._put("unit_finished", unit_id, at)

    def unit_quarantined(self, unit_id: int, reason: str, at: datetime) -> None:
        self._put("unit_quarantined", unit_id, reason, at)

    def quarantine_released(self, unit_id: int, at: datetime) -> None:
        self._put("quarantine_released", unit_id, at)

    def station_event(
        self, station: str, kind: str, at: datetime, state: int | None = None, detail: str = ""
    ) -> None:
        self._put("station_event", station, kind, at, state, detail)

    def operator_action(self, action: str, target: str, at: datetime, detail: str = "") -> None:
        self._put("operator_action", action, target, at, detail)
