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
