"""TraceStore: the asyncio face of the trace database.

Writes go through one bounded queue to one long-lived writer thread, which owns the write
connection and commits them in order, everything queued at that moment in one transaction:
writes made while a commit is in flight share the next one (group commit). Putting a write on
the queue costs no thread hop; the writer calls back into the event loop only for a batch
that someone awaits (a durable write or a flush), for room in a full queue, and for a failure.

``step_commanded`` returns only once its row is committed, because the caller commands the PLC
right after: that is the write-ahead intent a restart reconciles against. Other writes return
once queued; ``flush`` waits for all of them. If a transaction fails, the store stops taking
writes and every caller after that, and ``close``, gets the StoreError: no write is dropped
without someone hearing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from linectl.errors import StoreError
from linectl.store import maintenance, reads
from linectl.store.db import make_engine, mask, parse_url, scrub
from linectl.store.lease import Lease, acquire
from linectl.store.maintenance import DbFigures
from linectl.store.records import (
    DONE_RESULTS,
    EVENT_KINDS,
    OPERATOR_ACTIONS,
    STEP_RESULTS,
    UNIT_STATUSES,
    ExportRow,
    OperatorActionRecord,
    OperatorState,
    StationEventRecord,
    StoreStatistics,
    UnitRecord,
    UnitTrace,
)
from linectl.store.schema import prepare
from linectl.store.writes import Writer

log = logging.getLogger("linectl.store")

T = TypeVar("T")

_U32_MAX = 2**32 - 1
# Writes per transaction at most: bounds the latency an intent queued behind a burst sees.
_MAX_BATCH = 2_000
# How long writes nobody awaits may wait for company before the writer commits them anyway.
# Each commit is a sync to disk; without this a handover's few bookkeeping writes (accepted,
# finished, reset) would each get a commit of their own right after the intent's. Anything
# awaited (an intent, a flush, a close) is committed at once, taking the waiting writes along.
_LINGER_S = 0.05
_STOP = object()
_CALL = "call"  # a queue item (_CALL, function, future): run on the writer thread, in order
_MARKERS = ("flush", _CALL)  # queue items that are not writes


def _utc(at: datetime, what: str) -> datetime:
    if not isinstance(at, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} {at.isoformat()} is naive; give a timezone-aware UTC time")
    return at.astimezone(UTC)


def _int(value: int, what: str, low: int, high: int = _U32_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in {low}..{high}, not {value!r}")
    return value


def _one_of(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return value


Row = dict[str, Any]
P = ParamSpec("P")


class _Write:
    """A write method of TraceStore: ``row`` builds (and validates) the row for ``table``;
    calling it queues the row, waiting for room, and for the commit when ``durable``."""

    def __init__(self, table: str, row: Callable[..., Row], durable: bool, doc: str | None) -> None:
        self.table = table
        self.row = row
        self.durable = durable
        functools.update_wrapper(self, row)
        if doc is not None:
            self.__doc__ = doc

    def __get__(self, store: TraceStore | None, owner: type) -> Any:
        if store is None:
            return self
        return functools.partial(self, store)

    async def __call__(self, store: TraceStore, *args: Any, **kwargs: Any) -> None:
        await store._submit(self.table, self.row(store, *args, **kwargs), durable=self.durable)


_WRITES: dict[str, _Write] = {}  # by method name, for row()


def _write(
    table: str, *, durable: bool = False, name: str | None = None, doc: str | None = None
) -> Callable[
    [Callable[Concatenate[TraceStore, P], Row]],
    Callable[Concatenate[TraceStore, P], Coroutine[Any, Any, None]],
]:
    """Make a row builder the async write method of the same name (see ``_Write``)."""

    def make(row: Callable[Concatenate[TraceStore, P], Row]) -> Any:
        write = _Write(table, row, durable, doc)
        _WRITES[name or row.__name__] = write
        return write

    return make


class TraceStore:
    """Traceability of one line: units, their steps at stations, station events, quarantine."""

    def __init__(self, engine: Engine, where: str, line: str, queue_size: int) -> None:
        # Use TraceStore.open(): it prepares the schema and starts the writer.
        self._engine = engine
        self._where = where
        self.line = line
        # (kind, params, future or None): put by the event loop, taken by the writer thread.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queue_size = queue_size
        self._put = 0  # items ever put; written by the event loop only
        self._taken = 0  # items ever taken; written by the writer thread only
        self._room = asyncio.Event()
        self._room_wanted = False
        self._abandoned = False  # close() was cancelled: the writer stops after its batch
        self._reader_threads = ThreadPoolExecutor(2, thread_name_prefix=f"store-read-{line}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._fence: Callable[[Any], None] = lambda conn: None  # set by acquire_lease
        self._writer_done: asyncio.Future[None] | None = None
        self._in_flight: list[Any] = []  # the batch the writer is committing
        self._accepting = True
        self._closed = False
        self._failure: StoreError | None = None
        self._writes_queued = 0
        self._writes_committed = 0
        self._batches = 0
        self._last_batch_size = 0
        self._last_latency: float | None = None

    # --- Life cycle ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, url: str, line: str, *, queue_size: int = 10_000, create: bool = True
    ) -> TraceStore:
        """Open (creating or migrating its schema) the trace database at ``url``.

        ``create=False`` is for readers such as the CLI: a missing or outdated database is an
        error instead of being created or upgraded.
        """
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        where = mask(url)
        engine = make_engine(url, create=create)
        store = cls(engine, where, line, queue_size)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(store._reader_threads, store._prepare, url, create)
        except BaseException:
            # Also on cancellation: the threads exit once the prepare under way ends.
            store._release(wait=False)
            raise
        store._start_writer(loop)
        return store

    def _prepare(self, url: str, create: bool) -> None:
        try:
            prepare(self._engine, self._where, create=create)
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            detail = scrub(
                str(orig).strip().splitlines()[0] if str(orig).strip() else "", parse_url(url)
            )
            raise StoreError(f"trace store {self._where}: cannot open: {detail}") from exc

    async def close(self) -> None:
        """Stop taking writes, commit everything queued, stop the writer; raise its failure."""
        if self._closed:
            return
        self._accepting = False
        drained = False
        try:
            if self._writer_done is not None:
                if not self._writer_done.done():
                    self._queue.put(_STOP)
                await asyncio.shield(self._writer_done)
            drained = True
        finally:
            if not drained:
                # close() itself was cancelled (a shutdown deadline): so is the writer. It may
                # be stuck in a commit: do not block the loop on it; it ends after that commit.
                self._abandoned = True
                self._queue.put(_STOP)
                self._fail(
                    StoreError(
                        f"trace store {self._where}: writer cancelled; writes not confirmed"
                    ),
                    [],
                )
            self._closed = True
            self._release(wait=drained)
        if self._failure is not None:
            raise self._error()

    def _release(self, *, wait: bool) -> None:
        if wait and self._thread is not None:
            self._thread.join()
        self._reader_threads.shutdown(wait=wait, cancel_futures=True)
        if wait or self._thread is None:
            self._engine.dispose()

    async def __aenter__(self) -> TraceStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _error(self) -> StoreError:
        """A fresh error for each caller, chained to the writer's failure."""
        assert self._failure is not None
        error = StoreError(str(self._failure))
        error.__cause__ = self._failure
        return error

    def _check_writable(self) -> None:
        if self._failure is not None:
            raise self._error()
        if not self._accepting:
            raise StoreError(f"trace store {self._where} (line '{self.line}') is closed")

    # --- The writer ---------------------------------------------------------------------------

    async def _submit(self, kind: str, params: dict[str, Any], *, durable: bool = False) -> None:
        self._check_writable()
        while self._put - self._taken >= self._queue_size:
            # Full: wait until the writer takes a batch. Ask first, then look again, so a
            # batch taken in between is not missed (the writer reads the flag after taking).
            self._room.clear()
            self._room_wanted = True
            if self._put - self._taken < self._queue_size:
                break
            await self._room.wait()
            self._check_writable()
        future = self._loop.create_future() if durable else None
        self._queue.put((kind, params, future))
        self._put += 1
        if kind not in _MARKERS:
            self._writes_queued += 1
        if future is not None:
            await self._hold(future)

    def _hold(self, future: asyncio.Future[T]) -> asyncio.Future[T]:
        """``future``, which the writer thread settles: a virtual-time loop (linectl.virtual)
        must stand still until it does, as it does for executor work."""
        hold = getattr(self._loop, "hold", None)
        if hold is not None:
            hold(future)
        return future

    async def _on_writer(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the writer thread after every write queued before it is committed."""
        self._check_writable()
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((_CALL, fn, future))
        self._put += 1
        return await self._hold(future)

    def _start_writer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._writer_done = loop.create_future()
        self._thread = threading.Thread(
            target=self._write_forever, name=f"store-write-{self.line}", daemon=True
        )
        self._thread.start()

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` in the event loop's thread (from the writer thread)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to tell

    def _take(self) -> list[Any]:
        """The next batch: everything queued, once something in it is awaited or the first
        write has waited ``_LINGER_S`` (at most a full queue, and ``_MAX_BATCH``)."""
        most = min(_MAX_BATCH, self._queue_size)
        items = _items(self._queue.get())
        urgent = any(item is _STOP or item[2] is not None for item in items)
        deadline = None
        # A call ends a batch: it runs once the writes before it are committed.
        while len(items) < most and (items[-1] is _STOP or items[-1][0] != _CALL):
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if urgent or self._room_wanted:
                    break
                now = time.monotonic()
                deadline = now + _LINGER_S if deadline is None else deadline
                if now >= deadline:
                    break
                try:
                    item = self._queue.get(timeout=deadline - now)
                except queue.Empty:
                    break
            for one in _items(item):
                items.append(one)
                urgent = urgent or one is _STOP or one[2] is not None
        return items

    def _write_forever(self) -> None:
        """The writer thread: take everything queued, commit it in one transaction, repeat."""
        writer = Writer(self._engine, self._where, fence=lambda conn: self._fence(conn))
        try:
            stopping = False
            while not stopping and not self._abandoned:
                items = self._take()
                self._taken += len(items)
                if self._room_wanted:
                    self._room_wanted = False
                    self._to_loop(self._room.set)
                stopping = any(item is _STOP for item in items)
                batch = [item for item in items if item is not _STOP]
                if not batch or self._abandoned:
                    continue
                self._in_flight = list(batch)
                call = batch.pop() if batch[-1][0] == _CALL else None
                if batch and not self._commit(writer, batch):
                    return
                if call is not None:
                    self._call(call)
                self._in_flight = []
        except Exception as exc:  # a bug here must fail the store loudly, not hang its callers
            error = StoreError(f"trace store {self._where}: writer failed: {exc!r}")
            error.__cause__ = exc
            self._to_loop(self._fail, error, [])
        finally:
            writer.close()
            self._to_loop(_resolve, [self._writer_done])

    def _commit(self, writer: Writer, batch: list[Any]) -> bool:
        """Commit ``batch`` (writer thread); tell whoever waits; False if the store failed."""
        started = time.perf_counter()
        done, error = writer.apply([(kind, params) for kind, params, _ in batch])
        self._last_latency = time.perf_counter() - started
        self._batches += 1
        self._last_batch_size = len(batch)
        self._writes_committed += sum(1 for kind, _, _ in batch[:done] if kind not in _MARKERS)
        waiting = [future for _, _, future in batch[:done] if future is not None]
        if waiting:
            self._to_loop(_resolve, waiting)
        if error is not None:
            self._to_loop(self._fail, error, batch[done:])
            return False
        return True

    def _call(self, call: tuple[str, Callable[[], Any], asyncio.Future[Any]]) -> None:
        _, fn, future = call
        try:
            result = fn()
        except Exception as exc:  # the caller's to handle, in the loop
            self._to_loop(_settle, future, None, exc)
        else:
            self._to_loop(_settle, future, result, None)

    def _fail(self, error: StoreError, lost: list[Any]) -> None:
        if self._failure is None:
            self._failure = error
        self._accepting = False
        # Drain the queue so blocked writers wake up and see the failure.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            lost.extend(one for one in _items(item) if one is not _STOP)
        if lost or not self._closed:
            log.error("%s; %d write(s) not recorded", error, len(lost))
        for _, _, future in lost:
            if future is not None and not future.done():
                future.set_exception(self._error())
        self._room.set()

    # --- Writes -------------------------------------------------------------------------------
    #
    # Each write method below is written as the row it queues (validating its arguments);
    # ``_write`` makes it the async method that queues the row, waiting for room in a full
    # queue, and ``put_nowait`` queues the same row at once.

    def row(self, kind: str, *args: Any) -> tuple[str, Row]:
        """The write ``kind`` (the name of a write method below, with its arguments) as
        ``put_rows`` takes it; raises as that method would on arguments it refuses."""
        write = _WRITES[kind]
        return write.table, write.row(self, *args)

    def put_rows(self, rows: list[tuple[str, Row]]) -> None:
        """Queue ``rows`` (from ``row``) at once, in order with every other write, as one
        item: the writer thread is woken once for them, not once per row.

        For the journal, which writes from plain code on the dispatcher's path and hands its
        rows over once per turn of the event loop. It does not wait for room: the queue may
        pass ``queue_size`` between two commits, but every START waits for its durable
        intent, which waits for the commit that takes the whole queue, so the line never runs
        more than one batch ahead of the disk.
        """
        self._check_writable()
        if not rows:
            return
        self._queue.put(rows)
        self._put += len(rows)
        self._writes_queued += len(rows)

    @_write("unit_released")
    def unit_released(self, unit_id: int, serial: str, at: datetime) -> Row:
        """A unit entered the line."""
        return {
            "line": self.line,
            "unit_id": _int(unit_id, "unit_id", 1),
            "serial": serial,
            "status": "in_line",
            "released_at": _utc(at, "at"),
        }

    @_write("step_commanded", durable=True)
    def step_commanded(
        self,
        unit_id: int,
        station: str,
        slot: int,
        attempt: int,
        seq: int,
        at: datetime,
        branch: str | None = None,
    ) -> Row:
        """Write-ahead intent: returns once the step is committed, so the PLC may be commanded.

        ``branch`` is the route choice that sent the unit here (``"flow[0]=1"``); it is
        appended to the unit's branches, separated by ``;``.
        """
        return {
            "line": self.line,
            "unit_id": _int(unit_id, "unit_id", 1),
            "station": station,
            "slot": _int(slot, "slot", 0),
            "attempt": _int(attempt, "attempt", 1),
            "seq": _int(seq, "seq", 0),
            "commanded_at": _utc(at, "at"),
            "status": "commanded",
            "fault_code": 0,
            "b_branch": branch or None,
        }

    step_intended = _write(
        "step_commanded",
        name="step_intended",
        doc="Like step_commanded, but returns once queued: durable only after ``flush()``. For "
        "a caller that gathers several intents and makes them durable with one flush.",
    )(step_commanded.row)

    @_write("step_accepted")
    def step_accepted(self, unit_id: int, station: str, attempt: int, at: datetime) -> Row:
        """The PLC echoed the step's sequence number: the station started it."""
        return {**self._step_key(unit_id, station, attempt), "accepted_at": _utc(at, "at")}

    @_write("step_finished")
    def step_finished(
        self,
        unit_id: int,
        station: str,
        attempt: int,
        at: datetime,
        result: str,
        fault_code: int = 0,
        plc_cycle_s: float | None = None,
    ) -> Row:
        """The step ended: pass or reject (done), or fault, refused, abandoned (failed)."""
        _one_of(result, STEP_RESULTS, "result")
        return {
            **self._step_key(unit_id, station, attempt),
            "finished_at": _utc(at, "at"),
            "status": "done" if result in DONE_RESULTS else "failed",
            "result": result,
            "fault_code": _int(fault_code, "fault_code", 0),
            "plc_cycle_s": None if plc_cycle_s is None else float(plc_cycle_s),
        }

    @_write("unit_finished")
    def unit_finished(self, unit_id: int, at: datetime) -> Row:
        return {**self._unit_key(unit_id), "finished_at": _utc(at, "at")}

    @_write("unit_quarantined")
    def unit_quarantined(self, unit_id: int, reason: str, at: datetime) -> Row:
        return {**self._unit_key(unit_id), "reason": reason, "quarantined_at": _utc(at, "at")}

    @_write("quarantine_released")
    def quarantine_released(self, unit_id: int, at: datetime) -> Row:
        """A quarantined unit goes back into the line."""
        return {**self._unit_key(unit_id), "q_released_at": _utc(at, "at")}

    @_write("station_event")
    def station_event(
        self, station: str, kind: str, at: datetime, state: int | None = None, detail: str = ""
    ) -> Row:
        return {
            "line": self.line,
            "station": station,
            "at": _utc(at, "at"),
            "kind": _one_of(kind, EVENT_KINDS, "kind"),
            "state": state,
            "detail": detail,
        }

    @_write("operator_action")
    def operator_action(self, action: str, target: str, at: datetime, detail: str = "") -> Row:
        """An operator's action (pause, resume, a station in or out of service, a release)."""
        return {
            "line": self.line,
            "at": _utc(at, "at"),
            "action": _one_of(action, OPERATOR_ACTIONS, "action"),
            "target": target,
            "detail": detail,
        }

    async def flush(self) -> None:
        """Return once every write queued so far is committed."""
        if self._failure is not None:
            raise self._error()
        if self._writes_committed == self._writes_queued or self._closed:
            return
        await self._submit("flush", {}, durable=True)

    def _unit_key(self, unit_id: int) -> dict[str, Any]:
        return {"k_line": self.line, "k_unit": _int(unit_id, "unit_id", 1)}

    def _step_key(self, unit_id: int, station: str, attempt: int) -> dict[str, Any]:
        return {
            **self._unit_key(unit_id),
            "k_station": station,
            "k_attempt": _int(attempt, "attempt", 1),
        }

    async def acquire_lease(self, **options: Any) -> Lease:
        """Take this line's lease and fence every later write transaction with it: each reads
        the line's epoch first and refuses to go on if it moved on (store/lease.py)."""
        lease = await acquire(self._engine, self._where, self.line, **options)
        self._fence = lease.check_epoch
        return lease

    # --- Reads --------------------------------------------------------------------------------

    async def _read(self, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # Flushing first means a read sees every write queued before it.
        if self._closed:
            raise StoreError(f"trace store {self._where} (line '{self.line}') is closed")
        await self.flush()

        def run() -> T:
            try:
                with self._engine.connect() as conn:
                    return query(conn, *args, **kwargs)
            except SQLAlchemyError as exc:
                orig = getattr(exc, "orig", None) or exc
                raise StoreError(f"trace store {self._where}: query failed: {orig}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._reader_threads, run)

    async def next_unit_id(self) -> int:
        """The unit id after the highest this line ever used; 1 on an empty database."""
        return await self._read(reads.next_unit_id, self.line)

    async def open_units(self) -> list[UnitRecord]:
        """Units still in the line or in quarantine, each with its steps in order."""
        return await self._read(reads.units, self.line, status=("in_line", "quarantined"))

    async def units(
        self,
        status: str | Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        station: str | None = None,
        limit: int | None = None,
    ) -> list[UnitRecord]:
        """Units released in [since, until), with a status, through a station; oldest first."""
        if isinstance(status, str):
            status = (status,)
        for s in status or ():
            _one_of(s, UNIT_STATUSES, "status")
        return await self._read(
            reads.units,
            self.line,
            status=status,
            since=None if since is None else _utc(since, "since"),
            until=None if until is None else _utc(until, "until"),
            station=station,
            limit=limit,
        )

    async def trace(self, serial: str) -> UnitTrace:
        """A unit's whole history by serial; StoreError if no unit has that serial."""
        found = await self._read(reads.trace, serial)
        if found is None:
            raise StoreError(f"trace store {self._where}: no unit with serial '{serial}'")
        return found

    async def operator_actions(
        self, since: datetime | None = None, limit: int | None = None
    ) -> list[OperatorActionRecord]:
        """The operator's actions on this line, oldest first (the newest ``limit``)."""
        return await self._read(
            reads.operator_actions,
            self.line,
            since=None if since is None else _utc(since, "since"),
            limit=limit,
        )

    async def operator_state(self) -> OperatorState:
        """What the operator's actions leave in force, for a restart to put back."""
        return await self._read(reads.operator_state, self.line)

    async def station_events(
        self,
        station: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[StationEventRecord]:
        return await self._read(
            reads.station_events,
            self.line,
            station=station,
            since=None if since is None else _utc(since, "since"),
            until=None if until is None else _utc(until, "until"),
            limit=limit,
        )

    async def rename_steps(self, renames: Mapping[str, str], unit_ids: Sequence[int]) -> int:
        """Record the steps of ``unit_ids`` at each old station as at its new one, in one
        transaction (``linectl run --migrate OLD=NEW``); return the steps changed."""
        await self.flush()

        def run() -> int:
            try:
                with self._engine.begin() as conn:
                    return maintenance.rename_steps(conn, self.line, renames, unit_ids)
            except SQLAlchemyError as exc:
                orig = getattr(exc, "orig", None) or exc
                raise StoreError(f"trace store {self._where}: migration failed: {orig}") from exc

        return await self._on_writer(run)

    async def figures(self) -> DbFigures:
        """The database's size and its oldest stored step, for metrics (index lookups only)."""
        return await self._read(maintenance.figures, self.line)

    async def export(self, page_size: int = 5_000) -> AsyncIterator[list[ExportRow]]:
        """Every step of the line joined with its unit, a page at a time."""
        after = None
        while True:
            rows, after = await self._read(reads.export_page, self.line, after, page_size)
            if rows:
                yield rows
            if after is None:
                return

    # --- Statistics ---------------------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            writes_queued=self._writes_queued,
            writes_committed=self._writes_committed,
            batches=self._batches,
            queue_depth=max(0, self._put - self._taken),
            queue_size=self._queue_size,
            last_batch_size=self._last_batch_size,
            last_commit_latency_s=self._last_latency,
            failed=self._failure is not None,
        )


def _items(item: Any) -> list[Any]:
    """The queue items in what the queue held: one, or a list of rows from ``put_rows``."""
    if isinstance(item, list):
        return [(table, params, None) for table, params in item]
    return [item]


def _settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
