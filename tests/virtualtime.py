"""Run a test's coroutine on linectl's virtual-time loop (linectl/virtual.py): when nothing is
ready the clock jumps to the next timer, so an hour of ``asyncio.sleep`` takes microseconds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from linectl import virtual

T = TypeVar("T")


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` to completion on a fresh virtual-time loop, its clock starting at 0."""
    return virtual.run(cast(Coroutine[Any, Any, T], main()))
