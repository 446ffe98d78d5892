"""Virtual time: an asyncio event loop whose clock jumps to the next timer when nothing can run.

Everything that reads ``loop.time()`` and waits through the loop (``asyncio.sleep``,
``call_at``, ``asyncio.timeout``: the supervisor, the dispatcher, the in-process PLCs) runs
unchanged, but an hour of line time passes in the CPU time its events take. Like Trio's
autojump clock, the jump happens only when the loop has nothing ready to run.

Work outside the loop is the exception: a trace-store commit in its writer thread takes real
time, and the line must not move on while it is in flight (the journal's write-ahead intent is
awaited before a START). So ``run_in_executor`` work, and any future passed to ``hold`` (the
store's awaited commits), is counted, and while any is pending the loop waits for real I/O
with its clock standing still. Other real I/O (sockets) is polled but
not waited for: a virtual run talks to nothing over a network.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _JumpingSelector(selectors.BaseSelector):
    """The loop's selector. Asked to wait, it polls for I/O instead and, if there is none and
    no executor work is in flight, moves the loop's clock to the earliest timer."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.loop: VirtualEventLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        if timeout is not None and timeout <= 0:
            return self._real.select(0)
        if loop.external_pending:
            # A commit (or other executor work) is in flight: its completion wakes the loop
            # through the self-pipe. Until then line time stands still.
            loop.real_waits += 1
            return self._real.select(None)
        events = self._real.select(0)
        if events:
            return events
        if timeout is None:
            # No timer and nothing in flight: only another thread or a signal can wake us.
            return self._real.select(None)
        # The loop removed cancelled timers from the head of its heap before asking us to
        # wait, so the head is the earliest timer that will run: jump exactly to it, never
        # past it. (CPython keeps the timers in ``_scheduled``, a heap ordered by ``_when``.)
        loop.advance_to(loop._scheduled[0]._when)  # type: ignore[attr-defined]
        return []


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An event loop in virtual time, starting at ``start`` seconds."""

    def __init__(self, start: float = 0.0) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = float(start)
        self._external = 0
        self.jumps = 0  # times the clock moved forward
        self.real_waits = 0  # times the loop waited for executor work, clock standing still

    def time(self) -> float:
        return self._now

    def advance_to(self, when: float) -> None:
        """Move the clock forward to ``when`` (never back)."""
        if when > self._now:
            self._now = when
            self.jumps += 1

    @property
    def external_pending(self) -> int:
        """Executor calls started and not yet done."""
        return self._external

    def run_in_executor(
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        return self.hold(super().run_in_executor(executor, func, *args))

    def hold(self, future: asyncio.Future[T]) -> asyncio.Future[T]:
        """Count ``future``, settled by another thread (the trace store's writer), as work
        outside the loop, like an executor call, until it is done."""
        self._external += 1
        future.add_done_callback(self._external_done)
        return future

    def _external_done(self, _future: asyncio.Future[Any]) -> None:
        self._external -= 1


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """``asyncio.run(main)`` in virtual time, on a new ``VirtualEventLoop``."""
    with asyncio.Runner(loop_factory=lambda: VirtualEventLoop(start)) as runner:
        return runner.run(main)
