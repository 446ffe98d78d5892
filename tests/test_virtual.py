"""The virtual-time event loop: asyncio code runs unchanged while the clock jumps from timer to
timer, and stands still while work is out in an executor thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linectl import virtual
from linectl.virtual import VirtualEventLoop


def test_an_hour_of_sleep_takes_no_wall_time_and_ends_exactly_on_time():
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return start, loop.time()

    wall = time.perf_counter()
    start, end = virtual.run(main(), start=100.0)
    assert (start, end) == (100.0, 3700.0)
    assert time.perf_counter() - wall < 5.0  # not an hour; generous for a loaded machine


def test_sleepers_wake_in_order_each_at_its_own_deadline():
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, seconds: float) -> None:
            await asyncio.sleep(seconds)
            woke.append((name, loop.time()))

        async with asyncio.TaskGroup() as tg:
            for name, seconds in [("c", 30.0), ("a", 10.0), ("d", 45.5), ("b", 20.0)]:
                tg.create_task(sleeper(name, seconds))
        return woke

    assert virtual.run(main()) == [("a", 10.0), ("b", 20.0), ("c", 30.0), ("d", 45.5)]


def test_a_timeout_fires_at_its_deadline_in_virtual_time():
    async def main() -> float:
        loop = asyncio.get_running_loop()
        never = asyncio.Event()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(90):
                await never.wait()
        return loop.time()

    assert virtual.run(main()) == 90.0


def test_work_that_finishes_before_the_deadline_is_not_timed_out():
    async def main() -> str:
        async with asyncio.timeout(60):
            await asyncio.sleep(59.999)
            return "done"

    assert virtual.run(main()) == "done"


def test_a_cancelled_timer_does_not_pull_the_clock_forward():
    async def main() -> float:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(100, lambda: None)
        handle.cancel()
        await asyncio.sleep(5)
        return loop.time()

    assert virtual.run(main()) == 5.0


def test_the_clock_stands_still_while_executor_work_is_in_flight():
    """A trace-store commit runs in a thread: no timer may fire, however long it takes."""

    async def main() -> tuple[float, float, bool, float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sleeper = asyncio.ensure_future(asyncio.sleep(0.001))
        seen_in_thread = await loop.run_in_executor(
            None, lambda: (time.sleep(0.05), loop.time())[1]
        )
        done_meanwhile = sleeper.done()
        after_commit = loop.time()
        await sleeper
        return start, seen_in_thread, done_meanwhile, after_commit, loop.time()

    start, seen, done_meanwhile, after_commit, end = virtual.run(main(), start=7.0)
    assert (start, seen, after_commit) == (7.0, 7.0, 7.0)
    assert not done_meanwhile
    assert end == 7.001


def test_commits_interleaved_with_timers_add_no_line_time():
    """A writer committing in a thread while a ticker counts seconds: the ticker's clock ends
    at the seconds it slept, not a second more (the bug that made 420 s read 2,209 s)."""

    async def main() -> tuple[float, int, int]:
        loop = asyncio.get_running_loop()
        commits = 0

        async def writer() -> None:
            nonlocal commits
            for _ in range(20):
                await loop.run_in_executor(None, time.sleep, 0.002)
                commits += 1
                await asyncio.sleep(1)

        async def ticker() -> int:
            ticks = 0
            for _ in range(50):
                await asyncio.sleep(0.5)
                ticks += 1
            return ticks

        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer())
            ticks = tg.create_task(ticker())
        return loop.time(), commits, ticks.result()

    assert virtual.run(main()) == (25.0, 20, 50)


def test_a_cancelled_executor_call_stops_holding_the_clock():
    release = threading.Event()

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualEventLoop)
        future = loop.run_in_executor(None, release.wait, 5)
        assert loop.external_pending == 1
        future.cancel()
        await asyncio.sleep(3)
        pending = loop.external_pending
        release.set()
        return pending, loop.time()

    assert virtual.run(main()) == (0, 3.0)


def test_a_call_from_another_thread_wakes_a_loop_with_nothing_scheduled():
    async def main() -> str:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[str] = loop.create_future()
        thread = threading.Thread(target=lambda: loop.call_soon_threadsafe(got.set_result, "woken"))
        thread.start()
        try:
            return await got
        finally:
            thread.join()

    assert virtual.run(main()) == "woken"


def test_callbacks_at_the_same_time_all_run_before_the_clock_moves_on():
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []
        for name in "abc":
            loop.call_at(10.0, lambda n=name: seen.append((n, loop.time())))
        loop.call_at(10.5, lambda: seen.append(("z", loop.time())))
        await asyncio.sleep(11)
        return seen

    seen = virtual.run(main())
    assert sorted(seen[:3]) == [("a", 10.0), ("b", 10.0), ("c", 10.0)]
    assert seen[3] == ("z", 10.5)


@settings(max_examples=60, deadline=None)
@given(
    delays=st.lists(st.integers(0, 10**8).map(lambda ms: ms / 1000), max_size=30),
    chained=st.lists(st.integers(0, 50_000).map(lambda ms: ms / 1000), max_size=10),
)
def test_the_jump_never_passes_a_due_timer(delays, chained):
    """Every callback runs exactly at its deadline, in deadline order, including timers that
    callbacks schedule while the clock moves. (Deadlines in milliseconds: like any asyncio
    loop, this one runs a timer up to the clock's resolution, 1 ns, early.)"""

    async def main() -> list[tuple[float, float]]:
        loop = asyncio.get_running_loop()
        ran: list[tuple[float, float]] = []
        done = asyncio.Event()
        left = len(delays) + len(chained)

        def fire(when: float) -> None:
            nonlocal left
            ran.append((when, loop.time()))
            left -= 1
            if not left:
                done.set()

        def chain(when: float, rest: list[float]) -> None:
            fire(when)
            if rest:
                loop.call_at(when + rest[0], chain, when + rest[0], rest[1:])

        for d in delays:
            loop.call_at(d, fire, d)
        if chained:
            loop.call_at(chained[0], chain, chained[0], chained[1:])
        if left:
            await done.wait()
        return ran

    ran = virtual.run(main())
    assert all(when == at for when, at in ran), ran
    times = [at for _, at in ran]
    assert times == sorted(times)
    assert len(ran) == len(delays) + len(chained)
