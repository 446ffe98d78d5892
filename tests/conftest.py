"""Shared fixtures: leak checks for every test."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import pytest

# Fixtures shared by test modules: the TLS certificates (tests/pki.py).
pytest_plugins = ["tests.pki"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "function", None)):
            item.add_marker(pytest.mark.usefixtures("no_task_leaks"))


@pytest.fixture
async def no_task_leaks():
    """Fail an async test that leaves tasks running on its loop (pymodbus' system_health_check)."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test left tasks running: {[t.get_name() for t in leaked]}"


@pytest.fixture(autouse=True)
def no_thread_leaks():
    """Fail a test that leaves threads behind (after a short grace for executors to wind down)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        extra = [
            t
            for t in set(threading.enumerate()) - before
            if t.is_alive() and not t.daemon and not t.name.startswith("asyncio_")
        ]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not extra, f"test left threads running: {[t.name for t in extra]}"


@pytest.fixture(autouse=True)
def restore_logging():
    """A command run in-process (CliRunner) configures logging for a terminal: quieter
    third-party loggers, a rich handler. Undo that so it cannot leak into later tests."""
    import logging

    names = ["", "asyncua", "pymodbus", "linectl", "sqlalchemy.pool"]
    levels = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.getLogger().handlers)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
