"""PostgreSQL for tests: a fresh database on a real server, dropped at the end of the session.

Use from conftest.py with ``from tests.pg import pg_schema_url, pg_url  # noqa: F401``.
The server is postgresql://postgres@127.0.0.1:5432/postgres (trust auth) unless
LINECTL_TEST_PG_URL names another whose user may CREATE DATABASE. An unreachable server fails
the tests that need it, loudly: CI must not pass by skipping them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    url = os.environ.get("LINECTL_TEST_PG_URL", DEFAULT_ADMIN_URL)
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _connect(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {_masked(url)} is not reachable: {exc}\n"
            f"Start it, or set LINECTL_TEST_PG_URL to a server where the user may CREATE "
            f"DATABASE.",
            pytrace=False,
        )


def drop_database(admin: str, name: str) -> None:
    with _connect(admin) as conn:
        # DROP DATABASE refuses while anyone is connected, e.g. a pool a failed test leaked.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL (postgresql://) of a fresh, empty database that lives for the test session."""
    admin = admin_url()
    name = f"linectl_test_{secrets.token_hex(4)}"
    with _connect(admin) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(admin, name)
    finally:
        drop_database(admin, name)


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """URL of a fresh schema in the session's database: an empty database for one test.

    Cheaper than a database per test; the schema comes first on the search_path.
    """
    schema = f"t_{secrets.token_hex(4)}"
    with _connect(pg_url) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        joiner = "&" if "?" in pg_url else "?"
        yield f"{pg_url}{joiner}options=-csearch_path%3D{schema}"
    finally:
        with _connect(pg_url) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
