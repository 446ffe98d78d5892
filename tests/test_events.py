"""The line's event stream: what watchers (northbound, the line view) see, and its bounds."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from linectl.events import EventHub, LineChanged, StationChanged, UnitChanged
from tests.helpers import eventually
from tests.linefixtures import running_line
from tests.test_supervisor import make_line


def _unit(kind: str, uid: int) -> UnitChanged:
    return UnitChanged(kind, uid, f"t-{uid:06d}", "", "", 0.0, datetime.now(UTC))


async def test_a_slow_subscriber_loses_its_oldest_events_and_counts_them():
    hub = EventHub()
    slow = hub.subscribe("slow", maxsize=3)
    fast = hub.subscribe("fast", maxsize=100)
    for uid in range(1, 11):
        hub.publish(_unit("released", uid))
    assert [slow.get_nowait().unit_id for _ in range(3)] == [8, 9, 10]
    assert slow.dropped == 7 and fast.dropped == 0
    assert len(fast) == 10
    assert hub.dropped() == {"slow": 7, "fast": 0}
    with pytest.raises(asyncio.QueueEmpty):
        slow.get_nowait()


async def test_get_waits_for_the_next_event_and_close_unsubscribes():
    hub = EventHub()
    sub = hub.subscribe("x")
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish(_unit("finished", 1))
    assert (await asyncio.wait_for(waiter, 1)).kind == "finished"
    sub.close()
    assert not hub.active
    hub.publish(_unit("finished", 2))
    assert len(sub) == 0


async def test_a_running_line_reports_stations_units_and_counts():
    line = make_line({"a": "cycle_s: 1", "b": "cycle_s: 1"}, "[a, b]", extra="release: {count: 3}")
    events: list = []

    def line_done() -> bool:
        events.extend(sub.drain())
        return any(isinstance(e, LineChanged) and e.finished == 3 for e in events)

    async with running_line(line) as run:
        sub = run.sup.events.subscribe("test", maxsize=10_000)
        # The pass after the last unit's finish publishes the line's counts.
        await eventually(line_done, what="the line's counts with 3 finished")
    finished = [e.serial for e in events if isinstance(e, UnitChanged) and e.kind == "finished"]
    assert finished == ["t-000001", "t-000002", "t-000003"]
    working_at_b = [
        e
        for e in events
        if isinstance(e, StationChanged) and e.station == "b" and e.condition == "working"
    ]
    assert working_at_b and all(len(e.units) == 1 for e in working_at_b)
    assert {e.units[0] for e in working_at_b} == {"t-000001", "t-000002", "t-000003"}
    last = [e for e in events if isinstance(e, LineChanged)][-1]
    assert (last.released, last.finished, last.wip) == (3, 3, 0)
    assert all(e.at >= 0 for e in events)
