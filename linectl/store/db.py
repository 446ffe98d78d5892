"""Database URLs and engines: SQLite (WAL, synchronous=FULL) or PostgreSQL through psycopg 3."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from linectl.errors import StoreError

_PASSWORD = re.compile(r"(?P<head>[A-Za-z0-9+.-]+://[^/:@?#]*:)[^/?#]*@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)[^&#]*", re.IGNORECASE)

# How long a SQLite writer waits for another process's lock before failing.
_SQLITE_BUSY_TIMEOUT_MS = 10_000
_PG_CONNECT_TIMEOUT_S = 5
# Unacknowledged data for this long fails a PostgreSQL connection: a partitioned database
# breaks a commit within seconds instead of TCP's fifteen minutes of retransmission.
_PG_TCP_USER_TIMEOUT_MS = 5_000


def session_name(host: str | None = None, pid: int | None = None) -> str:
    """The PostgreSQL application_name of this process's store sessions: a standby taking over
    from a frozen owner ends that owner's sessions, which may hold row locks, by this name."""
    return f"linectl {host or socket.gethostname()} {pid or os.getpid()}"


def mask(url: str) -> str:
    """The URL with any password replaced by ***, safe to print and log."""
    return _QUERY_PASSWORD.sub(r"\g<head>***", _PASSWORD.sub(r"\g<head>***@", url))


def scrub(text: str, url: URL | None) -> str:
    """A driver message with the URL's password removed, in case the driver echoes it."""
    if url is not None and url.password:
        text = text.replace(str(url.password), "***")
    return text


def parse_url(url: str) -> URL:
    """Check a storage URL and pick the driver: postgresql:// means psycopg 3."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StoreError(
            f"trace store {mask(url)}: not a database URL; use sqlite:///FILE or "
            f"postgresql://USER@HOST/DB"
        ) from exc
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file::memory:"):
            raise StoreError(
                f"trace store {mask(url)}: an in-memory database dies with the process; "
                f"give a file, sqlite:///FILE"
            )
        return parsed.set(drivername="sqlite")
    raise StoreError(
        f"trace store {mask(url)}: unsupported database '{backend}'; "
        f"use sqlite:///FILE or postgresql://USER@HOST/DB"
    )


def make_engine(url: str, *, create: bool = True) -> Engine:
    """An engine for ``url``; ``create=False`` refuses to conjure up an empty SQLite file."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not create and not path.exists():
            raise StoreError(f"trace store {mask(url)}: no such database file '{path}'")
        engine = create_engine(parsed)
        _configure_sqlite(engine)
        return engine
    connect_args = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
    if "tcp_user_timeout" not in parsed.query:
        connect_args["tcp_user_timeout"] = _PG_TCP_USER_TIMEOUT_MS
    if "application_name" not in parsed.query:
        connect_args["application_name"] = session_name()
    return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        # The sqlite3 module would otherwise commit silently before DDL and start transactions
        # only before DML; with it out of the way SQLAlchemy's own BEGIN governs everything,
        # so a schema migration is one transaction.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit: a committed step survives a power cut too.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN")
