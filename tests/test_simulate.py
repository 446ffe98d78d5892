"""``linectl simulate``: the real supervisor against in-process PLCs in virtual time gives
``analyze``'s figures exactly for deterministic lines, the same run for the same seed, and the
same run with a trace store as without one."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import load_config, parse_config
from linectl.events import UnitChanged
from linectl.simulate import (
    Plan,
    SimulateError,
    mean_ci,
    run,
    run_once,
    simulate,
    unsimulated,
    virtual_line,
)
from tests.linefixtures import SMALL

SCENARIO_B = ["config/scenario-b-sequential.yaml", "config/scenario-b-hybrid.yaml"]


def simulate_one(line, plan: Plan, **kwargs):
    return run(run_once(virtual_line(line, plan), plan, seed=plan.seed, **kwargs))


def test_a_sequence_runs_exactly_at_its_bottleneck_pace():
    """With no controller latency in virtual time, 40 units of a 1 s / 2 s / 0.5 s sequence
    finish exactly at 3.5 + 2k s, one every 2 s, the bottleneck busy all the time."""
    m = simulate_one(parse_config(SMALL), Plan(units=40))
    assert m.finish_times_s == tuple(3.5 + 2 * k for k in range(40))
    assert m.makespan_s == 81.5
    assert m.interval_s == pytest.approx(2.0, abs=1e-9)
    assert m.bottleneck == "b"
    assert m.utilization["b"] == pytest.approx(1.0, abs=1e-9)
    # Over the steady window (20th finish to last release), c works 0.5 s of every 2.
    assert m.utilization["c"] == pytest.approx(0.25, abs=0.02)
    assert m.starved["b"] == pytest.approx(0.0, abs=1e-9)
    assert m.blocked["a"] == pytest.approx(0.5, abs=0.02)  # done after 1 s, waits 1 s for b


def test_scenario_b_simulates_to_analyzes_interval_and_makespan_within_half_a_percent():
    """720 s against 420 s, as the article says. (200 units: two parallel lines finish units
    in pairs, so for a short run the makespan is up to one unit's interval under analyze's,
    which spaces every unit one interval apart.)"""
    results = run(simulate([(n, load_config(n)) for n in SCENARIO_B], Plan(units=200)))
    sequential, hybrid = results
    assert (sequential.predicted.interval_s, hybrid.predicted.interval_s) == (720, 420)
    for r in results:
        (m,) = r.runs
        assert m.units == 200 and m.quarantined == 0
        assert m.interval_s == pytest.approx(r.predicted.interval_s, rel=0.005), r.config
        assert m.makespan_s == pytest.approx(r.predicted.makespan_s, rel=0.005), r.config
        assert m.bottleneck == r.predicted.bottleneck
        for name, load in r.predicted.stations.items():
            assert m.utilization[name] == pytest.approx(load.utilization, abs=0.02), name


def unit_outcomes(plan: Plan, seed: int) -> list[tuple[str, int, str, float]]:
    subs = []
    line = load_config("config/demo.yaml")
    simulate_one(
        line,
        Plan(units=plan.units, seed=seed),
        on_supervisor=lambda sup: subs.append(sup.events.subscribe("test", maxsize=100_000)),
    )
    (sub,) = subs
    assert sub.dropped == 0
    return [(e.kind, e.unit_id, e.station, e.at) for e in sub.drain() if isinstance(e, UnitChanged)]


def test_the_same_seed_gives_the_same_run_unit_by_unit():
    """The demo line with its spread, rejects and faults: every release, finish and quarantine
    of every unit at the same line time; another seed gives another run."""
    plan = Plan(units=150)
    first = unit_outcomes(plan, seed=7)
    assert first == unit_outcomes(plan, seed=7)
    assert {kind for kind, *_ in first} >= {"released", "finished", "quarantined"}
    assert first != unit_outcomes(plan, seed=8)


def test_a_trace_store_under_the_jumping_clock_changes_nothing():
    """A commit in flight holds the clock: with a SQLite store, the run is the run without one
    (before the fix, scenario B hybrid measured 2,209 s instead of 420 s)."""
    line = load_config("config/scenario-b-hybrid.yaml")
    without = simulate_one(line, Plan(units=20))
    stored = simulate_one(line, Plan(units=20, db="memory"))
    assert stored.finish_times_s == without.finish_times_s
    # Two lines finishing in pairs: 20 units take 3,540 s for the first two, 840 s per pair.
    assert stored.makespan_s == 3540 + 9 * 840 + 180


def test_a_database_keeps_the_trace_and_is_not_simulated_into_twice(tmp_path):
    url = f"sqlite:///{tmp_path / 'sim.sqlite3'}"
    line = parse_config(SMALL)
    simulate_one(line, Plan(units=6, db=url))

    async def units():
        from linectl.store import TraceStore

        async with await TraceStore.open(url, "small", create=False) as store:
            return await store.units(None, None, None, None, None)

    found = run(units())
    assert [u.status for u in found] == ["finished"] * 6
    assert {s.station for u in found for s in u.steps} == {"a", "b", "c"}
    with pytest.raises(SimulateError, match="already holds line 'small'"):
        simulate_one(line, Plan(units=6, db=url))


def test_an_hours_run_stops_counting_at_its_horizon():
    """A quarter of an hour of the small line: the first unit after 3.5 s, then one every 2 s;
    the units still in the line when it ends are not counted."""
    m = simulate_one(parse_config(SMALL), Plan(units=None, hours=0.25))
    assert m.units == math.floor((900 - 3.5) / 2) + 1
    assert max(m.finish_times_s) <= 900


def test_replications_differ_by_seed_and_give_a_confidence_interval():
    line = load_config("config/demo.yaml")
    (result,) = run(simulate([("demo", line)], Plan(units=100, replications=4, seed=3)))
    assert result.seeds == [3, 4, 5, 6]
    intervals = [m.interval_s for m in result.runs]
    assert len(set(intervals)) > 1
    data = result.to_dict()
    assert data["simulated"]["interval_s"]["mean"] == pytest.approx(sum(intervals) / 4)
    assert data["simulated"]["interval_s"]["ci95"] > 0
    assert set(data["simulated"]["stations"]["test"]) == {"utilization", "blocked", "starved"}


def test_mean_ci_is_students_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert mean_ci([5.0]) == (5.0, None)
    assert mean_ci([4.0, math.nan, 4.0]) == (4.0, 0.0)


def test_stations_without_a_sim_section_are_named():
    assert unsimulated(load_config("config/scenario-b-hybrid.yaml")) == list(
        load_config("config/scenario-b-hybrid.yaml").stations
    )
    assert unsimulated(load_config("config/demo.yaml")) == []


# --- the command ----------------------------------------------------------------------------


def test_simulate_prints_720_against_420_seconds():
    result = CliRunner().invoke(app, ["simulate", *SCENARIO_B])
    assert result.exit_code == 0, result.output
    assert "720 s (+0.0%)" in result.stdout
    assert "420 s (-0.1%)" in result.stdout
    assert result.stderr.count("simulated at nominal cycle_s") == 2


def test_simulate_json_has_the_analyze_keys_and_the_runs():
    runner = CliRunner()
    analyzed = json.loads(runner.invoke(app, ["analyze", "config/demo.yaml", "--json"]).stdout)
    result = runner.invoke(
        app, ["simulate", "config/demo.yaml", "--units", "50", "--replications", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(analyzed) <= set(data)
    assert data["seeds"] == [1, 2] and len(data["runs"]) == 2
    assert data["runs"][0]["units"] + data["runs"][0]["quarantined"] == 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hours", "0"], "--hours must be above 0"),
        (["--hours", "-2"], "--hours must be above 0"),
        (["--units", "0"], "--units must be 1 to 100,000, not 0"),
        (["--units", "-5"], "--units must be 1 to 100,000, not -5"),
        (["--replications", "0"], "--replications must be 1 to 1,000, not 0"),
        (["--units", "5", "--hours", "1"], "give --units or --hours, not both"),
    ],
)
def test_bad_arguments_get_one_line_and_a_non_zero_exit(args, message):
    result = CliRunner().invoke(app, ["simulate", "config/demo.yaml", *args])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"linectl simulate: {message}" or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
