"""The supervisor's ordered record of what happened, written to the trace store if there is one.

The dispatcher calls these methods from plain (non-async) code, so each write is appended to an
in-order queue that one task hands to the store. Only the write-ahead intent of a step is
awaited: it must be durable before the PLC is commanded. Waiting intents share one commit.

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
        self._intents: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failed: BaseException | None = None

    async def next_unit_id(self) -> int:
        return await self.store.next_unit_id() if self.store is not None else 1

    def _put(self, kind: str, *args: Any) -> None:
        if self.store is None:
            return
        if self._failed is not None:
            raise self._failed
        self._queue.append((kind, args))
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """Hand queued writes to the store, in order, until cancelled."""
        if self.store is None:
            await asyncio.Event().wait()
        while True:
            await self._wake.wait()
            self._wake.clear()
            intents, self._intents = self._intents, []
            try:
                while self._queue:
                    kind, args = self._queue.popleft()
                    await getattr(self.store, kind)(*args)
                if intents:
                    await self.store.flush()  # one commit makes every queued intent durable
            except Exception as exc:  # a store failure must reach every waiter, not vanish
                self._failed = exc
                for fut in intents:
                    if not fut.done():
                        fut.set_exception(exc)
                raise
            for fut in intents:
                if not fut.done():
                    fut.set_result(None)
            if not self._queue and not self._intents:
                self._idle.set()

    async def flush(self) -> None:
        """Wait until everything journalled so far is committed (needs ``run`` going)."""
        if self.store is None:
            return
        if self._queue or self._intents:
            await self._idle.wait()
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
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._intents.append(fut)
        await fut

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

    def unit_finished(self, unit_id: int, at: datetime, branch: str = "") -> None:
        self._put("unit_finished", unit_id, at)

    def unit_quarantined(self, unit_id: int, reason: str, at: datetime) -> None:
        self._put("unit_quarantined", unit_id, reason, at)

    def quarantine_released(self, unit_id: int, at: datetime) -> None:
        self._put("quarantine_released", unit_id, at)

    def station_event(
        self, station: str, kind: str, at: datetime, state: int | None = None, detail: str = ""
    ) -> None:
        self._put("station_event", station, kind, at, state, detail)
