"""Flow analysis against hand-computed figures, the bundled scenario-B configs, and properties."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from linectl.analysis import analyze, comparison_rows
from linectl.cli import app
from linectl.config import Line, load_config

CONFIG = Path(__file__).resolve().parent.parent / "config"


def station(cycle_s: float, **fields: Any) -> dict[str, Any]:
    return {"cycle_s": cycle_s, **fields}


def make_line(
    stations: dict[str, dict[str, Any]], flow: list[Any], release: dict[str, Any] | None = None
) -> Line:
    """A line on one OPC UA PLC (browse names need no register arithmetic)."""
    data: dict[str, Any] = {
        "line": "t",
        "plcs": {"p": {"protocol": "opcua", "url": "opc.tcp://127.0.0.1:14840"}},
        "stations": {name: {"plc": "p", "address": name, **st} for name, st in stations.items()},
        "flow": flow,
    }
    if release is not None:
        data["release"] = release
    return Line.model_validate(data)


def route(*branches: list[Any], policy: str = "round_robin", weights: Any = None) -> dict:
    spec: dict[str, Any] = {"policy": policy, "branches": list(branches)}
    if weights is not None:
        spec["weights"] = weights
    return {"route": spec}


def fork(*branches: list[Any]) -> dict:
    return {"fork": list(branches)}


# --- interval, bottleneck, lead time, makespan -------------------------------------------------


def test_sequence_is_paced_by_its_slowest_step_and_lead_time_is_the_sum():
    line = make_line({"a": station(30), "b": station(50), "c": station(20)}, ["a", "b", "c"])
    a = analyze(line, units=10)
    assert a.interval_s == 50  # max(30, 50, 20)
    assert a.bottleneck == "b"
    assert a.throughput_per_h == 72  # 3600 / 50
    assert a.lead_time_s == 100  # 30 + 50 + 20
    assert a.makespan_s == 550  # 100 + (10 - 1) × 50
    assert a.units == 10


def test_one_unit_takes_the_lead_time():
    line = make_line({"a": station(30), "b": station(50)}, ["a", "b"])
    assert analyze(line, units=1).makespan_s == 80


def test_units_below_one_are_refused():
    line = make_line({"a": station(30)}, ["a"])
    with pytest.raises(ValueError, match="units must be >= 1"):
        analyze(line, units=0)


def test_route_branch_rates_add_and_the_route_is_named_by_its_path():
    line = make_line(
        {"s": station(10), "x": station(60), "y": station(30)},
        ["s", route(["x"], ["y"])],
    )
    a = analyze(line)
    assert a.interval_s == 20  # 1 / (1/60 + 1/30) = 1 / (3/60)
    assert a.bottleneck == "route@flow[1]"
    assert a.lead_time_s == 70  # 10 + the slowest branch, 60


def test_a_station_slower_than_the_route_is_the_bottleneck():
    line = make_line(
        {"s": station(25), "x": station(60), "y": station(30)}, [route(["x"], ["y"]), "s"]
    )
    a = analyze(line)
    assert (a.interval_s, a.bottleneck) == (25, "s")  # the route passes one every 20 s


def test_every_balancing_policy_shares_by_rate():
    for policy in ("round_robin", "least_loaded", "shortest_expected"):
        line = make_line({"x": station(60), "y": station(30)}, [route(["x"], ["y"], policy=policy)])
        assert analyze(line).interval_s == 20, policy


def test_fork_is_paced_by_its_slowest_branch_and_takes_the_longest_branch_time():
    line = make_line(
        {"a": station(10), "b": station(40), "c": station(20), "d": station(30)},
        ["a", fork(["b"], ["c", "d"])],
    )
    a = analyze(line)
    assert a.interval_s == 40  # branch rates: 1/40 and min(1/20, 1/30)
    assert a.bottleneck == "b"
    assert a.lead_time_s == 60  # 10 + max(40, 20 + 30)


def test_capacity_divides_the_cycle_time():
    line = make_line({"a": station(90, capacity=3), "b": station(25)}, ["a", "b"])
    a = analyze(line)
    assert (a.interval_s, a.bottleneck) == (30, "a")  # 90 / 3 = 30 > 25
    assert a.lead_time_s == 115  # capacity does not shorten one unit's cycle: 90 + 25


def test_max_wip_caps_throughput_by_littles_law():
    stations = {"a": station(40), "b": station(60), "c": station(30), "d": station(20)}
    flow = ["a", "b", "c", "d"]  # lead time 150 s, flow interval 60 s (b)
    one = analyze(make_line(stations, flow, {"max_wip": 1}))
    assert (one.interval_s, one.bottleneck) == (150, "max_wip")  # 150 / 1
    two = analyze(make_line(stations, flow, {"max_wip": 2}))
    assert (two.interval_s, two.bottleneck) == (75, "max_wip")  # 150 / 2 = 75 > 60
    three = analyze(make_line(stations, flow, {"max_wip": 3}))
    assert (three.interval_s, three.bottleneck) == (60, "b")  # 150 / 3 = 50 < 60


def test_on_a_tie_the_flow_is_named_not_max_wip():
    line = make_line({"a": station(30), "b": station(30)}, ["a", "b"], {"max_wip": 2})
    a = analyze(line)
    assert (a.interval_s, a.bottleneck) == (30, "a")  # 60 / 2 = 30 = the flow's 30


def test_release_interval_caps_throughput():
    stations = {"a": station(10)}
    slow = analyze(make_line(stations, ["a"], {"interval_s": 25}))
    assert (slow.interval_s, slow.bottleneck) == (25, "release")
    fast = analyze(make_line(stations, ["a"], {"interval_s": 5}))
    assert (fast.interval_s, fast.bottleneck) == (10, "a")


def test_route_inside_a_fork():
    stations = {"p": station(40), "q": station(40), "r": station(30)}
    nested = [fork([route(["p"], ["q"])], ["r"])]
    a = analyze(make_line(stations, nested))
    assert (a.interval_s, a.bottleneck) == (30, "r")  # route 40 / 2 = 20, r 30
    a = analyze(make_line({**stations, "r": station(15)}, nested))
    assert (a.interval_s, a.bottleneck) == (20, "route@flow[0].fork[0][0]")
    assert a.lead_time_s == 40  # max(route's slowest branch 40, 15)


def test_fork_inside_a_route_branch():
    stations = {"a": station(20), "b": station(30), "c": station(10), "d": station(45)}
    a = analyze(make_line(stations, [route([fork(["a"], ["b"]), "c"], ["d"])]))
    # branch 0: rate min(1/20, 1/30, 1/10) = 1/30, lead max(20, 30) + 10 = 40
    # branch 1: rate 1/45, lead 45
    # route: 1/30 + 1/45 = 5/90 = 1/18
    assert (a.interval_s, a.bottleneck) == (18, "route@flow[0]")
    assert a.lead_time_s == 45
    # shares: (1/30) / (1/18) = 0.6 and 0.4
    assert a.stations["b"].utilization == pytest.approx(1.0)  # 30 × 0.6 / 18
    assert a.stations["a"].utilization == pytest.approx(2 / 3)  # 20 × 0.6 / 18
    assert a.stations["d"].utilization == pytest.approx(1.0)  # 45 × 0.4 / 18
    # work: branch 0 is 60 s (50 in the fork), branch 1 is 45 s
    # mean by traffic 0.6 × 60 + 0.4 × 45 = 54; inside forks 0.6 × 50 = 30
    assert a.serial_fraction == pytest.approx(24 / 54)


# --- utilization -------------------------------------------------------------------------------


def test_utilization_is_throughput_times_cycle_over_capacity():
    stations = {
        "a": station(30),
        "b": station(60, capacity=2),
        "c": station(45),
        "idle": station(5),
    }
    a = analyze(make_line(stations, ["a", "b", "c"]))
    assert a.interval_s == 45
    assert a.stations["a"].utilization == pytest.approx(30 / 45)
    assert a.stations["b"].utilization == pytest.approx(60 / 2 / 45)
    assert a.stations["c"].utilization == 1.0
    assert a.stations["idle"].utilization == 0.0  # defined but not in the flow


def test_utilization_falls_when_max_wip_limits():
    stations = {"a": station(30), "b": station(60)}
    a = analyze(make_line(stations, ["a", "b"], {"max_wip": 1}))
    assert a.interval_s == 90
    assert a.stations["b"].utilization == pytest.approx(60 / 90)


def test_balanced_route_loads_branches_by_their_rate():
    a = analyze(make_line({"x": station(60), "y": station(30)}, [route(["x"], ["y"])]))
    # interval 20; shares 1/3 and 2/3; x: 60 × 1/3 / 20 = 1, y: 30 × 2/3 / 20 = 1
    assert a.stations["x"].share == pytest.approx(1 / 3)
    assert a.stations["x"].utilization == pytest.approx(1.0)
    assert a.stations["y"].utilization == pytest.approx(1.0)


def test_weighted_route_shares_by_weight_and_names_the_saturated_branch():
    stations = {"x": station(30), "y": station(30)}
    a = analyze(make_line(stations, [route(["x"], ["y"], policy="weighted", weights=[3, 1])]))
    # x gets 3/4 of the units: the route saturates when x does, at 1/30 / (3/4) = 1/22.5
    assert (a.interval_s, a.bottleneck) == (22.5, "x")
    assert a.stations["x"].utilization == pytest.approx(1.0)  # 30 × 0.75 / 22.5
    assert a.stations["y"].utilization == pytest.approx(1 / 3)  # 30 × 0.25 / 22.5


def test_a_branch_with_weight_zero_carries_nothing():
    stations = {"x": station(30), "y": station(100)}
    a = analyze(make_line(stations, [route(["x"], ["y"], policy="weighted", weights=[1, 0])]))
    assert (a.interval_s, a.bottleneck, a.lead_time_s) == (30, "x", 30)
    assert a.stations["y"].utilization == 0.0


# --- Amdahl, yield, availability ---------------------------------------------------------------


def test_serial_fraction_and_amdahl_bound():
    stations = {n: station(c) for n, c in {"a": 30, "b": 10, "c": 25, "d": 10, "e": 5}.items()}
    stations["f"] = station(15)
    a = analyze(make_line(stations, ["a", fork(["b"], ["c", "d"], ["e"]), "f"]))
    # work 30 + 10 + 25 + 10 + 5 + 15 = 95, outside forks 30 + 15 = 45
    assert a.serial_fraction == pytest.approx(45 / 95)
    assert a.max_speedup == pytest.approx(95 / 45)


def test_a_line_without_forks_is_all_serial():
    a = analyze(make_line({"x": station(60), "y": station(30)}, [route(["x"], ["y"])]))
    assert (a.serial_fraction, a.max_speedup) == (1.0, 1.0)


def test_all_work_in_a_fork_has_no_amdahl_bound():
    a = analyze(make_line({"x": station(60), "y": station(30)}, [fork(["x"], ["y"])]))
    assert a.serial_fraction == 0.0
    assert math.isinf(a.max_speedup)
    assert a.to_dict()["max_speedup"] is None  # JSON has no infinity


def test_first_pass_yield_multiplies_along_the_path():
    def st_(cycle: float, reject: float) -> dict[str, Any]:
        return station(cycle, sim={"reject_p": reject})

    seq = analyze(make_line({"a": st_(10, 0.1), "b": st_(10, 0.2)}, ["a", "b"]))
    assert seq.first_pass_yield == pytest.approx(0.72)  # 0.9 × 0.8
    both = analyze(make_line({"a": st_(10, 0.1), "b": st_(10, 0.2)}, [fork(["a"], ["b"])]))
    assert both.first_pass_yield == pytest.approx(0.72)  # a unit goes through both branches
    either = analyze(make_line({"x": st_(30, 0.1), "y": st_(10, 0.3)}, [route(["x"], ["y"])]))
    # traffic shares by rate: 1/30 : 1/10 = 1/4 : 3/4; 0.25 × 0.9 + 0.75 × 0.7 = 0.75
    assert either.first_pass_yield == pytest.approx(0.75)


def test_availability_series_fork_and_route():
    def st_(cycle: float, up: float) -> dict[str, Any]:
        return station(cycle, availability=up)

    seq = analyze(make_line({"a": st_(10, 0.9), "b": st_(10, 0.8)}, ["a", "b"]))
    assert seq.availability == pytest.approx(0.72)
    both = analyze(make_line({"a": st_(10, 0.9), "b": st_(10, 0.8)}, [fork(["a"], ["b"])]))
    assert both.availability == pytest.approx(0.72)
    either = analyze(make_line({"x": st_(30, 0.9), "y": st_(10, 0.5)}, [route(["x"], ["y"])]))
    # weighted by rate, 1 : 3: (0.9 × 1 + 0.5 × 3) / 4 = 0.6
    assert either.availability == pytest.approx(0.6)


# --- the bundled scenario B ---------------------------------------------------------------------


def test_scenario_b_sequential_makes_one_unit_every_12_minutes_limited_by_testing():
    a = analyze(load_config(CONFIG / "scenario-b-sequential.yaml"))
    assert (a.interval_s, a.bottleneck) == (720, "testing")
    assert a.lead_time_s == 2220  # 300 + 360 + 240 + 420 + 720 + 180
    assert a.makespan_s == 2220 + 99 * 720


def test_scenario_b_hybrid_makes_one_unit_every_7_minutes_limited_by_the_parallel_lines():
    a = analyze(load_config(CONFIG / "scenario-b-hybrid.yaml"))
    # two lines of 840 s assembly: 2/840 = 1/420; testing 2/720 = 1/360
    assert (a.interval_s, a.bottleneck) == (420, "route@flow[0]")
    assert a.lead_time_s == 3540  # 600 + 720 + 480 + 840 + 720 + 180
    assert a.stations["testing"].utilization == pytest.approx(720 / 2 / 420)


def test_scenario_b_runs_fast_enough_for_compare():
    # `linectl compare` runs 100 units of each in well under a minute of wall time.
    for name in ("scenario-b-sequential.yaml", "scenario-b-hybrid.yaml"):
        line = load_config(CONFIG / name)
        assert analyze(line, units=100).makespan_s * line.time_scale < 45, name


def test_demo_finishes_about_one_unit_a_second():
    line = load_config(CONFIG / "demo.yaml")
    assert analyze(line).interval_s * line.time_scale == pytest.approx(1.0, rel=0.2)


def test_to_dict_has_exactly_the_documented_keys_and_is_json():
    data = analyze(load_config(CONFIG / "scenario-b-hybrid.yaml")).to_dict()
    assert set(data) == {
        "line",
        "interval_s",
        "throughput_per_h",
        "lead_time_s",
        "makespan_s",
        "units",
        "bottleneck",
        "stations",
        "serial_fraction",
        "max_speedup",
        "first_pass_yield",
        "availability",
    }
    assert data["stations"]["testing"] == {"utilization": pytest.approx(720 / 2 / 420)}
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_comparison_rows_put_lines_side_by_side():
    seq = analyze(load_config(CONFIG / "scenario-b-sequential.yaml"))
    hyb = analyze(load_config(CONFIG / "scenario-b-hybrid.yaml"))
    rows = dict(comparison_rows([seq, hyb]))
    assert rows["bottleneck"] == ["testing", "route@flow[0]"]
    assert rows["  testing"] == ["100%", "86%"]
    assert rows["  l1_assembly"] == ["-", "100%"]


# --- linectl analyze ----------------------------------------------------------------------------


def test_analyze_json_gives_a_list_for_several_configs():
    seq, hyb = CONFIG / "scenario-b-sequential.yaml", CONFIG / "scenario-b-hybrid.yaml"
    result = CliRunner().invoke(app, ["analyze", str(seq), str(hyb), "--json", "--units", "10"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["interval_s"] for d in data] == [720, 420]
    assert data[0]["units"] == 10


def test_analyze_json_gives_one_object_for_one_config():
    result = CliRunner().invoke(app, ["analyze", str(CONFIG / "demo.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["line"] == "demo"


def test_analyze_prints_a_table():
    seq, hyb = CONFIG / "scenario-b-sequential.yaml", CONFIG / "scenario-b-hybrid.yaml"
    result = CliRunner().invoke(app, ["analyze", str(seq), str(hyb)])
    assert result.exit_code == 0, result.output
    assert "route@flow[0]" in result.stdout
    assert "720 s" in result.stdout


def test_analyze_reports_a_config_error_and_exits_2(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (CONFIG / "scenario-b-sequential.yaml").read_text().replace("- testing", "- tst")
    )
    result = CliRunner().invoke(app, ["analyze", str(CONFIG / "demo.yaml"), str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:" in result.stderr
    assert "unknown station 'tst'" in result.stderr
    assert result.stdout == ""


# --- properties ---------------------------------------------------------------------------------

cycles = st.integers(min_value=1, max_value=1000) | st.floats(min_value=0.01, max_value=1e4)
capacities = st.integers(min_value=1, max_value=4)


def _leaf(draw: st.DrawFn) -> tuple[float, int]:
    return (draw(cycles), draw(capacities))


@st.composite
def flows(draw: st.DrawFn, depth: int = 2) -> list[Any]:
    """A random flow of (cycle_s, capacity) leaves, routes and forks, up to ``depth`` deep."""
    steps = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(
            st.sampled_from(["station", "station", "route", "fork"] if depth else ["station"])
        )
        if kind == "station":
            steps.append(_leaf(draw))
        else:
            n = draw(st.integers(min_value=1, max_value=3))
            steps.append((kind, [draw(flows(depth - 1)) for _ in range(n)]))
    return steps


def build(flow: list[Any], counter: itertools.count | None = None) -> tuple[dict, list[Any]]:
    """Name every leaf s0, s1...; return (stations, flow) for make_line."""
    counter = counter if counter is not None else itertools.count()
    stations: dict[str, dict[str, Any]] = {}
    out: list[Any] = []
    for step in flow:
        if isinstance(step[0], str):
            kind, branches = step
            built = []
            for branch in branches:
                sub_stations, sub_flow = build(branch, counter)
                stations.update(sub_stations)
                built.append(sub_flow)
            out.append(route(*built) if kind == "route" else fork(*built))
        else:
            name = f"s{next(counter)}"
            stations[name] = station(step[0], capacity=step[1])
            out.append(name)
    return stations, out


@settings(max_examples=60, deadline=None)
@given(flows(), flows(depth=1))
def test_adding_a_parallel_branch_never_increases_the_interval(branch: list[Any], extra: list):
    stations, (base, added) = build([("route", [branch]), ("route", [branch, extra])])
    # the same stations twice would be invalid in one flow; analyse two lines
    one = analyze(make_line(stations, [base]))
    two = analyze(make_line(stations, [added]))
    assert two.interval_s <= one.interval_s


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(cycles, capacities), min_size=1, max_size=8))
def test_a_sequence_is_never_faster_than_its_slowest_station(leaves: list[tuple[float, int]]):
    stations, flow = build(leaves)
    a = analyze(make_line(stations, flow))
    assert a.interval_s >= max(c / k for c, k in leaves)
    assert a.interval_s == pytest.approx(max(c / k for c, k in leaves))
    assert a.lead_time_s == pytest.approx(sum(c for c, _ in leaves))


@settings(max_examples=60, deadline=None)
@given(flows(), st.none() | st.integers(min_value=1, max_value=10))
def test_no_station_is_over_full_and_the_bottleneck_is_full(flow: list[Any], max_wip: int | None):
    stations, built = build(flow)
    release = {"max_wip": max_wip} if max_wip else None
    a = analyze(make_line(stations, built, release))
    loads = [s.utilization for s in a.stations.values()]
    assert max(loads) <= 1.0
    if a.bottleneck != "max_wip":
        assert max(loads) == pytest.approx(1.0)
    if max_wip:
        assert a.interval_s >= a.lead_time_s / max_wip * (1 - 1e-12)  # Little's law
