"""Small test utilities: waiting on conditions with a deadline, never sleeping for luck."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    *,
    within: float = 5.0,
    interval: float = 0.005,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``within`` s."""
    last: object = None
    try:
        async with asyncio.timeout(within):
            while True:
                value = probe()
                if inspect.isawaitable(value):
                    value = await value
                last = value
                if value:
                    return value
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(
            f"timed out after {within} s waiting for {what}; last: {last!r}"
        ) from None


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


async def start_linectl(*args: str, cwd: object = None) -> asyncio.subprocess.Process:
    """``linectl ARGS`` in a child process (this checkout's code), its output piped."""
    import os
    import sys

    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "linectl.cli",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"},
    )


async def read_line_with(stream: asyncio.StreamReader, text: str, *, within: float = 20) -> str:
    """The first output line containing ``text``; fails if the process ends first."""
    async with asyncio.timeout(within):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the process ended before printing {text!r}"
            if text in line:
                return line


async def read_json_logs(
    stream: asyncio.StreamReader, seen: list[dict], text: str, *, within: float = 20
) -> dict:
    """Read ``--log-format json`` records into ``seen`` until one's message holds ``text``."""
    import json

    async with asyncio.timeout(within):
        while True:
            raw = await stream.readline()
            assert raw, f"linectl ended early; last records: {seen[-5:]}"
            if raw.startswith(b"{"):
                seen.append(json.loads(raw))
                if text in seen[-1]["msg"]:
                    return seen[-1]


async def interrupt(proc: asyncio.subprocess.Process, *, within: float = 20) -> tuple[str, str]:
    """Ctrl-C ``proc``; it must exit 0 within ``within`` s. Returns the rest of its output."""
    import signal

    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(within):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace"), err.decode(errors="replace")


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if a failed test left it running."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
