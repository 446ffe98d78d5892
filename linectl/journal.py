"""The supervisor's ordered record of what happened, written to the trace store if there is one.

The dispatcher calls these methods from plain (non-async) code. Each write is made into its row
at once (so a bad argument raises at the caller) and the rows of one turn of the event loop go
onto the store's queue together, in call order, at the end of the turn or before anything waits
for durability: no task and no coroutine per write, and one wake-up of the store's writer
thread per turn. Two things wait for durability: a step's write-ahead intent (before its
START) and a RESET (before the PLC forgets a unit's result). Everything waiting at the same
moment shares one commit (the store's writer commits all it has queued at once).

The store's queue needs no room check here: every write belongs to a step, and steps are
throttled by the awaited intents, so the queue can only grow as fast as the store commits.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Protocol


class Store(Protocol):  # what the journal needs of linectl.store.TraceStore
    def row(self, kind: str, *args: Any) -> Any: ...
    def put_rows(self, rows: list[Any]) -> None: ...
    async def next_unit_id(self) -> int: ...
    async def flush(self) -> None: ...


class Journal:
    """In-order writes to ``store``; with no store it records nothing and costs nothing."""

    def __init__(self, store: Any | None = None) -> None:
        self.store = store
        self._rows: list[Any] = []  # made this turn, not yet on the store's queue
        self._failed: Exception | None = None  # the store refused rows handed over at a turn's end

    @property
    def recording(self) -> bool:
        """Whether writes go anywhere: callers skip building a record nobody keeps."""
        return self.store is not None

    async def next_unit_id(self) -> int:
        return await self.store.next_unit_id() if self.store is not None else 1

    def _put(self, kind: str, *args: Any) -> None:
        if self.store is None:
            return
        if self._failed is not None:
            raise self._failed
        self._rows.append(self.store.row(kind, *args))
        if len(self._rows) == 1:
            asyncio.get_running_loop().call_soon(self._hand_over_later)

    def _hand_over(self) -> None:
        rows, self._rows = self._rows, []
        self.store.put_rows(rows)

    def _hand_over_later(self) -> None:
        try:
            self._hand_over()
        except Exception as exc:  # the store failed: the next write or sync raises it
            self._failed = exc

    async def sync(self) -> None:
        """Return once every write made so far is durable."""
        if self.store is None:
            return
        if self._failed is not None:
            raise self._failed
        self._hand_over()
        await self.store.flush()

    async def flush(self) -> None:
        """Wait until everything journalled so far is committed (the same as ``sync``)."""
        await self.sync()

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
