"""A live run over sockets and a virtual run of the same deterministic line make the same
routing decisions in the same order: the engine decides, not the clock it runs on."""

from __future__ import annotations

import asyncio

import pytest

from linectl.config import parse_config
from linectl.journal import Journal
from linectl.simulate import Plan, run, run_once, virtual_line
from linectl.store import TraceStore
from tests.linefixtures import run_to_completion
from tests.test_supervisor import make_line

# Cycle times chosen so that no two cycles of the run end closer than 0.1 line seconds apart
# (50 ms at this time scale, against a handover of a few ms): a loaded machine does not swap
# them, and the routing is not a plain alternation.
LINE = make_line(
    {
        "a": "cycle_s: 0.89",
        "r1": "cycle_s: 2.85",
        "r2": "cycle_s: 5.25",
        "f1": "cycle_s: 0.34",
        "f2": "cycle_s: 0.99",
        "z": "cycle_s: 0.77",
    },
    "[a, {route: {policy: least_loaded, branches: [[r1], [r2]]}}, {fork: [[f1], [f2]]}, z]",
    time_scale=0.5,
    extra="release: {count: 10, max_wip: 6}",
)


async def decisions(url: str, line: str) -> dict[str, list[int]]:
    """Per station, the units it was commanded to start, in order."""
    async with await TraceStore.open(url, line, create=False) as store:
        units = await store.units(None, None, None, None, None)
    steps = sorted(
        ((s.commanded_at, u.unit_id, s.station) for u in units for s in u.steps),
    )
    out: dict[str, list[int]] = {}
    for _at, unit, station in steps:
        out.setdefault(station, []).append(unit)
    return out


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_live_run_and_a_virtual_run_route_the_same_units_the_same_way(tmp_path):
    line = parse_config(LINE)
    live_url = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    async with await TraceStore.open(live_url, line.line) as store:
        _sim, sup = await run_to_completion(line, within=45, journal=Journal(store))
    assert sup.finished == 10
    live = await decisions(live_url, line.line)

    virtual_url = f"sqlite:///{tmp_path / 'virtual.sqlite3'}"
    plan = Plan(units=10, db=virtual_url)
    # The virtual run in its own thread: a loop of its own, virtual time.
    await asyncio.to_thread(run, run_once(virtual_line(line, plan), plan, seed=1))
    simulated = await decisions(virtual_url, line.line)
    assert set(live["r1"]) | set(live["r2"]) == set(range(1, 11))
    # Not a trivial pattern: the fast branch takes most units, and units overtake.
    assert simulated["r1"] == [1, 3, 4, 6, 7, 9, 10]
    assert simulated["z"] == [1, 3, 2, 4, 6, 5, 7, 9, 8, 10]
    assert live == simulated
