"""A virtual-time event loop for tests: when nothing is ready, the clock jumps to the next timer.

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(main())   # an hour of asyncio.sleep() takes microseconds

Only code that reads time from the loop (``loop.time()``, ``call_at``, ``asyncio.sleep``,
``asyncio.timeout``) and does no real I/O runs correctly on it.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0)  # the loop's own self-pipe (call_soon_threadsafe)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("virtual time: nothing is scheduled and nothing can happen")
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector loop whose ``time()`` starts at 0 and only moves when the loop would wait."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` to completion on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main())  # type: ignore[arg-type]
