"""The measured constraint: the blocked/starved method over a sliding window, with the
shifting-bottleneck rule."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linectl.bottleneck import ConstraintMonitor, ConstraintTracker, active_shares, judge


def cum(**per_station: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    """station=(working, blocked, starved) cumulative seconds."""
    return {
        n: {"working": w, "blocked": b, "starved": s, "faulted": 0.0, "out_of_service": 0.0}
        for n, (w, b, s) in per_station.items()
    }


def test_the_station_least_blocked_or_starved_is_the_constraint():
    t = ConstraintTracker(window_s=100)
    t.observe(0, cum(a=(0, 0, 0), b=(0, 0, 0), c=(0, 0, 0)))
    c = t.observe(10, cum(a=(3, 0, 7), b=(9, 1, 0), c=(4, 6, 0)))
    assert c.station == "b"
    assert c.active == {"a": pytest.approx(0.3), "b": pytest.approx(0.9), "c": pytest.approx(0.4)}
    assert c.shifting == ()
    assert t.moves == 0  # naming the first constraint is not a move


def test_faulted_time_is_active_and_out_of_service_time_is_not():
    shares, span = active_shares(
        {},
        {
            "down": {"working": 2, "faulted": 8, "blocked": 0, "starved": 0},
            "taken_out": {"working": 1, "out_of_service": 9},
        },
    )
    assert shares == {"down": 1.0, "taken_out": pytest.approx(0.1)}
    assert span == 10


def test_close_stations_shift_and_the_named_constraint_stays_until_clearly_beaten():
    t = ConstraintTracker(window_s=10, margin=0.05)
    t.observe(0, cum(a=(0, 0, 0), b=(0, 0, 0)))
    assert t.observe(10, cum(a=(9, 1, 0), b=(8, 2, 0))).station == "a"
    # Over the next window b is busier, but only by 0.03: shifting, a stays named.
    c = t.observe(20, cum(a=(18, 2, 0), b=(17.3, 2.7, 0)))
    assert (c.station, c.shifting) == ("a", ("a", "b"))
    assert c.is_shifting and t.moves == 0
    # Then b leads by far more than the margin: the constraint moves.
    c = t.observe(30, cum(a=(24, 6, 0), b=(27.3, 2.7, 0)))
    assert (c.station, c.shifting, t.moves) == ("b", (), 1)


def test_the_window_slides_so_old_history_stops_counting():
    t = ConstraintTracker(window_s=10)
    t.observe(0, cum(a=(0, 0, 0), b=(0, 0, 0)))
    t.observe(100, cum(a=(100, 0, 0), b=(10, 90, 0)))  # a busy for a long time
    t.observe(105, cum(a=(100, 5, 0), b=(15, 90, 0)))
    c = t.observe(110, cum(a=(100, 10, 0), b=(20, 90, 0)))  # the last 10 s: only b works
    assert c.station == "b" and c.window_s == 10


def test_an_idle_line_names_nothing_and_an_idle_spell_keeps_the_last_constraint():
    t = ConstraintTracker(window_s=10)
    t.observe(0, cum(a=(0, 0, 0), b=(0, 0, 0)))
    assert t.observe(10, cum(a=(0, 0, 10), b=(0, 0, 10))).station is None
    t.observe(20, cum(a=(10, 0, 10), b=(2, 0, 18)))
    assert t.current.station == "a"
    c = t.observe(30, cum(a=(10, 0, 20), b=(2, 0, 28)))  # paused: everything starved
    assert c.station == "a" and t.moves == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="window_s"):
        ConstraintTracker(window_s=0)
    with pytest.raises(ValueError, match="margin"):
        ConstraintTracker(window_s=1, margin=1)


shares_st = st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.floats(0, 1), min_size=1)


@given(shares_st, st.sampled_from([None, "a", "b", "c", "d", "e"]), st.floats(0, 0.5))
def test_judge_names_a_station_within_the_margin_of_the_leader(shares, current, margin):
    station, shifting = judge(shares, current, margin)
    lead = max(shares.values())
    if lead < 0.02:
        assert station is None and shifting == ()
        return
    assert station is not None and lead - shares[station] <= margin
    if current in shares and lead - shares[current] <= margin:
        assert station == current  # the named constraint is kept while it is close
    if shifting:
        assert shifting[0] == station and len(set(shifting)) == len(shifting) > 1
        assert all(lead - shares[n] <= margin for n in shifting)


@given(
    st.lists(
        st.tuples(st.floats(0, 5), st.floats(0, 5), st.floats(0, 5), st.floats(0, 5)),
        min_size=1,
        max_size=40,
    )
)
def test_moves_count_only_changes_between_named_stations(steps):
    t = ConstraintTracker(window_s=7, margin=0.05)
    totals = {"a": [0.0, 0.0], "b": [0.0, 0.0]}
    names: list[str | None] = []
    for i, (aw, ai, bw, bi) in enumerate(steps):
        totals["a"][0] += aw
        totals["a"][1] += ai
        totals["b"][0] += bw
        totals["b"][1] += bi
        c = t.observe(
            float(i),
            {n: {"working": w, "starved": s} for n, (w, s) in totals.items()},
        )
        assert set(c.active) <= {"a", "b"}
        assert all(0 <= v <= 1 for v in c.active.values())
        names.append(c.station)
    named = [n for n in names if n is not None]
    changes = sum(1 for x, y in itertools.pairwise(named) if x != y)
    assert t.moves == changes


ROUTE = """
line: r
time_scale: 0.05
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.005}
stations:
  k: {plc: p, address: 0, cycle_s: 1}
  p1: {plc: p, address: 40, cycle_s: 4}
  p2: {plc: p, address: 80, cycle_s: 4}
flow: [k, {route: {branches: [[p1], [p2]]}}]
"""


@pytest.mark.slow
async def test_taking_the_constraint_out_of_service_moves_it_and_the_move_is_recorded(tmp_path):
    """Two equal presses share the work (the bottleneck shifts between them); once the named
    one is taken out of service the other does all the work, and the move is logged, counted
    and recorded as a constraint_moved station event in the trace store."""
    from linectl.journal import Journal
    from linectl.store import TraceStore
    from tests.helpers import eventually
    from tests.linefixtures import running_line

    moved: list[tuple[str | None, str | None]] = []
    url = f"sqlite:///{tmp_path / 'trace.sqlite3'}"
    async with await TraceStore.open(url, "r") as store:
        async with running_line(ROUTE, journal=Journal(store)) as run:
            monitor = ConstraintMonitor(
                run.sup, window_s=30, period_s=1, on_move=lambda a, b: moved.append((a, b.station))
            )

            def named() -> str | None:
                monitor.sample()
                return monitor.current.station

            # k names itself while the presses fill up; then a press leads.
            await eventually(lambda: named() in ("p1", "p2"), within=10, what="a press")
            first = monitor.current.station
            other = "p2" if first == "p1" else "p1"
            before = monitor.moves
            run.sup.set_in_service(first, False)

            def moved_away() -> bool:
                monitor.sample()
                return monitor.current.station == other

            await eventually(moved_away, within=10, interval=0.05, what=f"a move to {other}")
            assert moved[-1] == (first, other) and monitor.moves == before + 1
        events = await store.station_events(other)
    recorded = [e for e in events if e.kind == "constraint_moved"]
    assert recorded and recorded[-1].detail.startswith(f"from {first} ")
