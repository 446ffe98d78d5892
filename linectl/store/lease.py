"""One owner per line: a lease in the trace store, with a fencing epoch.

Whoever takes the lease raises the line's epoch by one. From then on every transaction of the
store's engine first reads the epoch (in the same transaction) and refuses to go on if it is
not its own, so an old owner that wakes up cannot write a row. Before every command the
supervisor calls ``Lease.check()``, which refuses once the lease may have run out, so that old
owner cannot command a PLC either.

- PostgreSQL: the owner holds an advisory lock on a dedicated connection and renews
  ``expires_at`` (database time) every quarter of the lease; it counts its lease valid only
  until a fraction of the lease after its last renewal was *sent*, so its own deadline passes
  before the database's. A candidate takes over once the database says the lease expired; if
  the old owner's connection still holds the lock (a frozen process), it ends that backend.
- SQLite: one host only. The owner holds an exclusive ``flock`` on a file beside the database
  for as long as it runs; the kernel lets go of it when the process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Connection, Engine, bindparam, create_engine, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from linectl.errors import LeaseHeld, LeaseLost, StoreError
from linectl.store.db import session_name
from linectl.store.schema import LineLease

log = logging.getLogger("linectl.lease")

# The classid half of our advisory lock keys ('lnct'), so pg_locks shows which locks are ours.
_LOCK_CLASS = 0x6C6E6374
# The owner counts on its lease for this share of the lease time after sending a renewal.
_TRUST = 0.8
_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds (or last held) a line's lease."""

    epoch: int
    host: str
    pid: int
    since: datetime
    expires_at: datetime | None

    def describe(self) -> str:
        return (
            f"host {self.host} pid {self.pid} since "
            f"{self.since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC (epoch {self.epoch})"
        )


def _holder(row: Any) -> Holder | None:
    if row is None:
        return None
    since = row.since if row.since.tzinfo else row.since.replace(tzinfo=UTC)
    expires = row.expires_at
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return Holder(row.epoch, row.host, row.pid, since, expires)


_leases = LineLease.__table__
_READ = select(_leases).where(_leases.c.line == bindparam("line"))


class Lease:
    """The right to run one line. ``check()`` before every command; ``keep()`` renews it in a
    task until it is lost (then raises LeaseLost); ``release()`` hands it on at once."""

    def __init__(self, line: str, where: str, epoch: int, ttl_s: float) -> None:
        self.line = line
        self.where = where
        self.epoch = epoch
        self.ttl_s = ttl_s
        self.lost: LeaseLost | None = None
        self._valid_until = float("inf")
        # Seconds the previous owner's lease had been expired when we took over, and when.
        self.took_over: tuple[float, float] | None = None
        self.first_command_after_s: float | None = None

    def check(self) -> None:
        """Raise LeaseLost unless this process surely still owns the line."""
        if self.lost is None and time.monotonic() > self._valid_until:
            self._lose(
                f"its lease ran out {time.monotonic() - self._valid_until:.1f} s ago "
                f"without a renewal (process frozen or database unreachable)"
            )
        if self.lost is not None:
            raise self.lost
        if self.took_over is not None and self.first_command_after_s is None:
            expired_for, at = self.took_over
            self.first_command_after_s = expired_for + time.monotonic() - at
            log.info(
                "line '%s': first command %.2f s after the previous owner's lease expired",
                self.line,
                self.first_command_after_s,
            )

    def _lose(self, why: str) -> LeaseLost:
        if self.lost is None:
            self.lost = LeaseLost(
                f"line '{self.line}': this process (pid {os.getpid()}, epoch {self.epoch}) no "
                f"longer owns the line: {why}; it commands nothing and writes nothing more"
            )
            log.error("%s", self.lost)
        return self.lost

    def check_epoch(self, conn: Connection) -> None:
        """The first statement of every write transaction (on the writer's thread): refuse
        the transaction unless the line's epoch is still this lease's. On PostgreSQL FOR SHARE
        makes a takeover's epoch update wait for it, and it for a takeover under way, so a
        write lands wholly before or wholly after a change of owner."""
        if self.lost is not None:
            raise self.lost
        postgres = conn.dialect.name == "postgresql"
        sql = "SELECT epoch, host, pid FROM leases WHERE line = " + (
            "%s FOR SHARE" if postgres else "?"
        )
        # The driver's own cursor: the writer may run its transaction outside SQLAlchemy's.
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.execute(sql, (self.line,))
            row = cursor.fetchone()
        finally:
            cursor.close()
        if row is None or row[0] != self.epoch:
            who = f"host {row[1]} pid {row[2]} (epoch {row[0]})" if row else "nobody"
            raise self._lose(f"the store refused its write: the line is held by {who}")

    async def keep(self) -> None:
        """Renew until lost; raise LeaseLost then. Cancel it to stop renewing."""
        raise NotImplementedError

    async def release(self) -> None:
        raise NotImplementedError


# --- PostgreSQL --------------------------------------------------------------------------------


class PgLease(Lease):
    def __init__(
        self,
        line: str,
        where: str,
        epoch: int,
        ttl_s: float,
        conn: Connection,
        engine: Engine,
        thread: ThreadPoolExecutor,
    ) -> None:
        super().__init__(line, where, epoch, ttl_s)
        self._conn = conn
        self._engine = engine
        self._thread = thread

    def _renew(self) -> bool:
        result = self._conn.execute(
            text(
                "UPDATE leases SET expires_at = now() + make_interval(secs => :ttl) "
                "WHERE line = :line AND epoch = :epoch"
            ),
            {"ttl": self.ttl_s, "line": self.line, "epoch": self.epoch},
        )
        return result.rowcount == 1

    async def keep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ttl_s / 4)
            if self.lost is not None:
                raise self.lost
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self.ttl_s * _TRUST):
                    renewed = await loop.run_in_executor(self._thread, self._renew)
            except TimeoutError:
                raise self._lose("the database did not answer a renewal in time") from None
            except SQLAlchemyError as exc:
                orig = getattr(exc, "orig", None) or exc
                detail = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
                raise self._lose(f"the lease connection failed: {detail}") from exc
            if not renewed:
                raise self._lose(f"another process took it over ({await self._who()})")
            self._valid_until = max(self._valid_until, sent + self.ttl_s * _TRUST)

    async def _who(self) -> str:
        def read() -> str:
            with self._engine.connect() as conn:
                holder = _holder(conn.execute(_READ, {"line": self.line}).first())
            return holder.describe() if holder else "unknown"

        try:
            return await asyncio.get_running_loop().run_in_executor(None, read)
        except SQLAlchemyError:
            return "holder unknown"

    async def release(self) -> None:
        def let_go() -> None:
            try:
                if self.lost is None:
                    # Expire now, so a standby need not wait out the lease.
                    self._conn.execute(
                        text(
                            "UPDATE leases SET expires_at = now() "
                            "WHERE line = :line AND epoch = :epoch"
                        ),
                        {"line": self.line, "epoch": self.epoch},
                    )
            except SQLAlchemyError as exc:
                log.warning("line '%s': could not hand the lease back: %s", self.line, exc)
            finally:
                # Closing the connection ends the session and with it the advisory lock.
                self._conn.invalidate()
                self._conn.close()
                self._engine.dispose()

        self._valid_until = -float("inf") if self.lost is None else self._valid_until
        try:
            if self.lost is None:
                await asyncio.get_running_loop().run_in_executor(self._thread, let_go)
            else:
                # The connection may hang (a partition): leave it to the thread, do not wait.
                self._thread.submit(let_go)
        finally:
            self._thread.shutdown(wait=self.lost is None)


def _pg_try(conn: Connection, line: str, ttl_s: float) -> tuple[int, float] | tuple[Holder, bool]:
    """One attempt to take the lease on ``conn``: (epoch, seconds the old lease had been
    expired) on success; else (who holds it, whether it comes free within a lease time)."""
    key = {"cls": _LOCK_CLASS, "line": line}
    got = conn.execute(text("SELECT pg_try_advisory_lock(:cls, hashtext(:line))"), key).scalar()
    row = conn.execute(
        text(
            "SELECT epoch, host, pid, since, expires_at, backend_pid, "
            "EXTRACT(EPOCH FROM now() - expires_at) AS expired_for FROM leases WHERE line = :line"
        ),
        {"line": line},
    ).first()
    holder = _holder(row)
    expired_for = None if row is None or row.expires_at is None else float(row.expired_for)
    expired = expired_for is None or expired_for > 0
    if not got:
        if row is not None and expired:
            # The lease ran out but its holder's session still holds the lock: a frozen or
            # cut-off owner. End its sessions (the lease's, and the store's, which may hold
            # row locks in a transaction it froze in) so the next attempt gets through.
            name = session_name(row.host, row.pid)
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name IN (:a, :b) "
                    "AND pid <> pg_backend_pid()"
                ),
                {"a": name, "b": f"{name} lease"},
            )
        unknown = Holder(0, "unknown", 0, datetime.now(UTC), None)
        return holder or unknown, row is not None and expired
    if holder is not None and not expired and not _dead_here(holder):
        # We have the lock, so the old owner's session is gone and it cannot renew; but until
        # its lease runs out it may still command. Keep the lock and wait.
        return holder, True
    me = {"line": line, "host": socket.gethostname(), "pid": os.getpid(), "ttl": ttl_s}
    # One statement in autocommit: atomic on its own.
    epoch = conn.execute(
        text(
            "INSERT INTO leases (line, epoch, host, pid, backend_pid, since, expires_at) "
            "VALUES (:line, 1, :host, :pid, pg_backend_pid(), now(), "
            "now() + make_interval(secs => :ttl)) "
            "ON CONFLICT (line) DO UPDATE SET epoch = leases.epoch + 1, host = :host, "
            "pid = :pid, backend_pid = pg_backend_pid(), since = now(), "
            "expires_at = now() + make_interval(secs => :ttl) RETURNING epoch"
        ),
        me,
    ).scalar_one()
    return epoch, max(expired_for or 0.0, 0.0)


def _dead_here(holder: Holder) -> bool:
    """Whether the holder was a process of this host that no longer exists: a restart after a
    crash (kill -9, OOM) need not wait out a lease nobody can use any more."""
    if holder.host != socket.gethostname() or holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


async def _acquire_pg(
    engine: Engine, where: str, line: str, *, standby: bool, ttl_s: float, announce: Callable
) -> Lease:
    # A partitioned database must fail the lease connection, not hang it for TCP's minutes.
    connect_args = {"connect_timeout": 5, "tcp_user_timeout": int(ttl_s * 1000 * _TRUST)}
    lease_engine = create_engine(engine.url, poolclass=NullPool, connect_args=connect_args)
    thread = ThreadPoolExecutor(1, thread_name_prefix=f"lease-{line}")
    loop = asyncio.get_running_loop()
    conn: Connection | None = None
    done = False
    try:

        def connect() -> Connection:
            c = lease_engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            c.execute(
                text("SELECT set_config('application_name', :n, false)"),
                {"n": f"{session_name()} lease"},
            )
            # Never queue for long behind a lock (a frozen owner's transaction): fail the
            # attempt, end the frozen sessions, and try again.
            c.exec_driver_sql("SET lock_timeout = '1s'")
            return c

        conn = await loop.run_in_executor(thread, connect)
        waited: Holder | None = None
        while True:
            sent = time.monotonic()
            try:
                found = await loop.run_in_executor(thread, _pg_try, conn, line, ttl_s)
            except SQLAlchemyError as exc:
                orig = getattr(exc, "orig", None) or exc
                detail = str(orig).strip().splitlines()[0] if str(orig).strip() else repr(orig)
                if not standby:
                    raise StoreError(
                        f"trace store {where}: cannot take the lease: {detail}"
                    ) from exc
                # A lock timeout behind a frozen owner, or a lost connection: a standby
                # carries on with a fresh connection.
                log.info("line '%s': lease attempt failed (%s); trying again", line, detail)
                old, conn = conn, None
                await loop.run_in_executor(thread, old.invalidate)
                await asyncio.sleep(_POLL_S)
                conn = await loop.run_in_executor(thread, connect)
                continue
            if isinstance(found[0], int):
                epoch, expired_for = found
                # Renewals may queue behind a write transaction's FOR SHARE on the lease row;
                # their own deadline is the lease's, not the attempt's one second.
                await loop.run_in_executor(thread, conn.exec_driver_sql, "SET lock_timeout = 0")
                lease = PgLease(line, where, epoch, ttl_s, conn, lease_engine, thread)
                lease._valid_until = sent + ttl_s * _TRUST
                if waited is not None:
                    lease.took_over = (expired_for, sent)
                    log.warning(
                        "line '%s': took over (epoch %d) from %s, whose lease had expired "
                        "%.2f s before",
                        line,
                        epoch,
                        waited.describe(),
                        expired_for,
                    )
                done = True
                return lease
            holder, coming_free = found
            if not standby and not coming_free:
                raise LeaseHeld(
                    f"line '{line}' is held by {holder.describe()}; run with --standby to "
                    f"take over when it stops"
                )
            if waited is None or waited.epoch != holder.epoch:
                announce(
                    f"line '{line}' is held by {holder.describe()}; "
                    + ("standing by for its lease" if standby else "waiting for its lease to end")
                )
            waited = holder
            await asyncio.sleep(_POLL_S)
    finally:
        if not done:
            # Also on cancellation (a standby stopped while waiting): drop connection and lock.
            if conn is not None:
                thread.submit(conn.invalidate)
            thread.shutdown(wait=False)
            lease_engine.dispose()


# --- SQLite ------------------------------------------------------------------------------------


class FileLease(Lease):
    def __init__(self, line: str, where: str, epoch: int, file: TextIO) -> None:
        super().__init__(line, where, epoch, ttl_s=0.0)
        self._file = file

    async def keep(self) -> None:
        # The kernel holds the lock for us until the process ends; nothing to renew.
        await asyncio.Event().wait()

    async def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _lock_path(engine: Engine, line: str) -> Path:
    db = Path(engine.url.database or "")
    return db.with_name(f"{db.name}.{line}.lock")


def _take_epoch(engine: Engine, line: str) -> int:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now(UTC)}
    upsert = sqlite_insert(_leases).values(line=line, epoch=1, **me)
    upsert = upsert.on_conflict_do_update(
        index_elements=["line"], set_={"epoch": _leases.c.epoch + 1, "expires_at": None, **me}
    )
    with engine.begin() as conn:
        conn.execute(upsert)
        return conn.execute(select(_leases.c.epoch).where(_leases.c.line == line)).scalar_one()


def _read_holder(engine: Engine, line: str) -> Holder | None:
    with engine.connect() as conn:
        return _holder(conn.execute(_READ, {"line": line}).first())


async def _acquire_file(
    engine: Engine, where: str, line: str, *, standby: bool, announce: Callable
) -> Lease:
    path = _lock_path(engine, line)
    file = path.open("a")
    loop = asyncio.get_running_loop()
    announced = False
    done = False
    try:
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = await loop.run_in_executor(None, _read_holder, engine, line)
                who = holder.describe() if holder else "another process"
                if not standby:
                    raise LeaseHeld(
                        f"line '{line}' is held by {who}; run with --standby to take over when "
                        f"it stops"
                    ) from None
                if not announced:
                    announce(f"line '{line}' is held by {who}; waiting for it to stop (standby)")
                    announced = True
                await asyncio.sleep(_POLL_S)
        epoch = await loop.run_in_executor(None, _take_epoch, engine, line)
        done = True
    finally:
        if not done:
            file.close()  # which lets go of the lock, if we had it
    return FileLease(line, where, epoch, file)


async def acquire(
    engine: Engine,
    where: str,
    line: str,
    *,
    standby: bool = False,
    ttl_s: float = 3.0,
    announce: Callable[[str], None] = log.warning,
) -> Lease:
    """Take the line's lease, waiting for it with ``standby``; without, a line held by a live
    owner is refused with LeaseHeld naming it. The store fences its writes with
    ``Lease.check_epoch``."""
    if engine.dialect.name == "postgresql":
        return await _acquire_pg(
            engine, where, line, standby=standby, ttl_s=ttl_s, announce=announce
        )
    return await _acquire_file(engine, where, line, standby=standby, announce=announce)


__all__ = ["Holder", "Lease", "LeaseHeld", "LeaseLost", "StoreError", "acquire"]
