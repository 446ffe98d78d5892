"""The supervisor moves, balances and protects units, against the bundled simulators.

Every run checks the invariants at every event (released = finished + quarantined + in line;
no station over capacity; no unit at two places outside a fork).
"""

from __future__ import annotations

import pytest

from linectl.analysis import analyze
from linectl.compare import fitted_interval
from linectl.config import load_config, parse_config
from linectl.contract import State
from tests.helpers import eventually
from tests.linefixtures import (
    SMALL,
    run_to_completion,
    run_virtual,
    running_line,
)

PLC = {
    "modbus": "{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.005}",
    "opcua": '{protocol: opcua, url: "opc.tcp://127.0.0.1:0", publishing_interval_s: 0}',
}


def make_line(
    stations: dict[str, str],
    flow: str,
    *,
    protocol: str = "modbus",
    extra: str = "",
    time_scale: float = 0.01,
    plcs: int = 1,
) -> str:
    """A line on ``plcs`` PLCs of one protocol; stations go round-robin over the PLCs."""
    plc_lines = "\n".join(f"  p{i}: {PLC[protocol]}" for i in range(plcs))
    st_lines = []
    for i, (name, spec) in enumerate(stations.items()):
        address = i * 40 if protocol == "modbus" else repr(name)
        st_lines.append(f"  {name}: {{plc: p{i % plcs}, address: {address}, {spec}}}")
    return (
        f"line: t\ntime_scale: {time_scale}\nplcs:\n{plc_lines}\nstations:\n"
        + "\n".join(st_lines)
        + f"\nflow: {flow}\n{extra}"
    )


def path_of(sup, sim, unit_id: int) -> list[str]:
    return [name for name, done in sim.completions().items() if done[unit_id]]


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
async def test_units_flow_through_sequence_route_and_fork(protocol):
    """Every unit visits one branch of the route and every branch of the fork, exactly once."""
    line = make_line(
        {
            "a": "cycle_s: 1",
            "r1": "cycle_s: 2",
            "r2": "cycle_s: 2",
            "f1": "cycle_s: 1",
            "f2": "cycle_s: 1.5",
            "z": "cycle_s: 1, capacity: 2",
        },
        "[a, {route: {branches: [[r1], [r2]]}}, {fork: [[f1], [f2]]}, z]",
        protocol=protocol,
        extra="release: {count: 12}",
    )
    sim, sup = await run_to_completion(line)
    assert (sup.finished, len(sup.quarantined), sup.released) == (12, 0, 12)
    counts = sim.completions()
    for unit in range(1, 13):
        visited = {name for name, done in counts.items() if done[unit]}
        assert {"a", "f1", "f2", "z"} <= visited
        assert len(visited & {"r1", "r2"}) == 1
        assert all(done[unit] == 1 for done in counts.values() if done[unit])


@pytest.mark.parametrize("name", ["scenario-b-sequential", "scenario-b-hybrid"])
def test_scenario_b_reaches_the_predicted_interval(name):
    """In virtual time (no controller latency): 720 s and 420 s, to 0.5 %."""
    line = load_config(f"config/{name}.yaml")
    line = line.model_copy(update={"release": line.release.model_copy(update={"count": 40})})
    run = run_virtual(line)
    # A least-squares fit, as compare's: the hybrid's two lines finish units in pairs.
    measured = fitted_interval(run.stats.finish_times, skip=20)  # in line seconds
    predicted = analyze(line).interval_s
    assert measured == pytest.approx(predicted, rel=0.005)


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
async def test_with_faults_and_rejects_no_unit_is_lost_or_run_twice(protocol):
    """5% faults and 5% rejects at every station over 200 units."""
    sim_spec = "sim: {reject_p: 0.05, fault_p: 0.05, seed: %d}"
    line = make_line(
        {f"s{i}": f"cycle_s: 1, {sim_spec % i}" for i in range(4)},
        "[s0, {route: {branches: [[s1], [s2]]}}, s3]",
        protocol=protocol,
        time_scale=0.005,
        extra="release: {count: 200}\nretry: {attempts: 3, backoff_s: 0}",
    )
    sim, sup = await run_to_completion(line, within=60)
    assert sup.released == 200
    assert sup.finished + len(sup.quarantined) == 200
    assert sup.rejected > 0 and sum(s.faults for s in sup.stations.values()) > 0
    for name, done in sim.completions().items():
        # A cycle that completes is never repeated: a unit completes each station at most once.
        assert max(done.values(), default=0) <= 1, name
    for reason in {u.reason.split(" at ")[0].split(" ")[0] for u in sup.quarantined.values()}:
        assert reason in ("rejected", "faulted")


async def test_a_unit_that_faults_on_every_try_is_quarantined_with_its_reason():
    line = make_line(
        {"a": "cycle_s: 1", "bad": "cycle_s: 1, sim: {fault_p: 1.0, fault_code: 77}"},
        "[a, bad]",
        extra="release: {count: 2}\nretry: {attempts: 2, backoff_s: 0}",
    )
    sim, sup = await run_to_completion(line)
    assert len(sup.quarantined) == 2
    unit = sup.quarantined[1]
    assert unit.reason == "faulted 2 times at bad (last fault code 77)"
    assert sim.station("bad").aborts[1] == 2


async def test_a_released_quarantined_unit_goes_back_where_it_failed():
    line = make_line(
        {"a": "cycle_s: 1", "b": "cycle_s: 1, sim: {fault_p: 1.0}"},
        "[a, b]",
        extra="release: {count: 1}\nretry: {attempts: 1, backoff_s: 0}",
    )
    async with running_line(line) as run:
        await eventually(lambda: run.sup.quarantined, what="a quarantined unit")
        await eventually(
            lambda: all(
                s.status and s.status.state == State.IDLE for s in run.sup.stations["b"].slots
            ),
            what="b reset",
        )
        run.sim.station("b").config = run.sim.station("b").config.model_copy(
            update={"sim": run.sim.station("b").config.sim.model_copy(update={"fault_p": 0.0})}
        )
        run.sup.release_quarantined(1)
        await run.wait_finished(1)
        await eventually(lambda: run.sup.finished == 1, what="the unit to finish")
        assert run.sim.station("a").completions[1] == 1  # not sent through 'a' again
        assert run.sim.station("b").completions[1] == 1


@pytest.mark.parametrize(
    ("policy", "weights", "expected_share_fast"),
    [
        ("round_robin", None, 0.5),
        ("weighted", "[1, 3]", 0.25),
        ("least_loaded", None, 0.75),
        ("shortest_expected", None, 0.75),
    ],
)
def test_each_policy_gives_the_share_it_promises(policy, weights, expected_share_fast):
    """Branch 'fast' runs 3x the rate of 'slow'. Round robin shares equally, weighted by its
    weights, and the load-aware policies in proportion to the branches' rates (virtual time:
    the decisions alone, no handover latency to blur them)."""
    weights_yaml = f", weights: {weights}" if weights else ""
    line = make_line(
        {"fast": "cycle_s: 1", "slow": "cycle_s: 3"},
        f"[{{route: {{policy: {policy}{weights_yaml}, branches: [[fast], [slow]]}}}}]",
        extra="release: {count: 40}",
    )
    run = run_virtual(line)
    fast, slow = run.starts("fast"), run.starts("slow")
    assert fast + slow == 40
    assert fast / 40 == pytest.approx(expected_share_fast, abs=0.03)


async def test_a_branch_out_of_service_gets_no_work_until_it_is_back():
    line = make_line(
        {"r1": "cycle_s: 1", "r2": "cycle_s: 1"},
        "[{route: {branches: [[r1], [r2]]}}]",
        extra="release: {count: 1000}",
    )
    async with running_line(line) as run:
        await run.wait_finished(4)
        run.sup.set_in_service("r1", False)
        await eventually(lambda: run.sup.stations["r1"].load() == 0, what="r1 drained")
        before = sum(run.sim.station("r1").starts.values())
        done = run.sup.finished
        await eventually(lambda: run.sup.finished >= done + 10, what="10 more units")
        assert sum(run.sim.station("r1").starts.values()) == before
        run.sup.set_in_service("r1", True)
        await eventually(
            lambda: sum(run.sim.station("r1").starts.values()) > before, what="r1 working again"
        )


async def test_a_disconnected_plc_delays_only_the_units_that_need_it():
    """Two parallel lines on two PLCs: with line 1's PLC down, line 2 keeps working, and the
    units stuck in line 1 finish once it is back. Nothing is lost."""
    line = make_line(
        {"l1": "cycle_s: 1", "l2": "cycle_s: 1"},
        "[{route: {policy: round_robin, branches: [[l1], [l2]]}}]",
        plcs=2,
        extra="release: {count: 40}",
    )
    async with running_line(line) as run:
        await run.wait_finished(4)
        await run.sim.servers["p0"].stop()
        await eventually(lambda: not run.sup.stations["l1"].connected, what="p0 seen lost")
        done = run.sup.finished
        await eventually(lambda: run.sup.finished >= done + 8, what="line 2 carrying on")
        assert run.sup.stations["l2"].connected
        await run.sim.servers["p0"].start()
        await run.wait_finished(40, within=30)
        assert run.sup.finished == 40
        assert max(run.sim.station("l1").completions.values()) == 1


async def test_pause_stops_release_and_resume_restarts_it():
    line = make_line({"a": "cycle_s: 1"}, "[a]", extra="release: {count: 1000}")
    async with running_line(line) as run:
        await run.wait_finished(2)
        run.sup.pause(True)
        released = run.sup.released
        await eventually(lambda: run.sup.units == {}, what="line empty")
        assert run.sup.released == released
        run.sup.pause(False)
        await eventually(lambda: run.sup.released > released, what="release again")


def test_max_wip_one_runs_one_unit_at_a_time():
    line = make_line(
        {"a": "cycle_s: 1", "b": "cycle_s: 1"},
        "[a, b]",
        extra="release: {count: 6, max_wip: 1}",
    )
    run = run_virtual(line)
    assert run.stats.finished == 6
    # One at a time: the next unit starts only when the last has left, so units finish a
    # whole lead time (two 1 s cycles) apart, exactly.
    assert run.stats.finish_times == pytest.approx((2.0, 4.0, 6.0, 8.0, 10.0, 12.0), abs=1e-9)


async def test_stop_drains_in_flight_steps():
    line = make_line({"a": "cycle_s: 10"}, "[a]", extra="release: {count: 100}")
    async with running_line(line) as run:
        await eventually(
            lambda: (
                run.sup.stations["a"].slots[0].status
                and run.sup.stations["a"].slots[0].status.state == State.EXECUTE
            ),
            what="a unit in process",
        )
        run.sup.stop()
        await run.task
        assert run.sim.station("a").completions[1] == 1
        assert run.sup.released == 1


def test_config_flows_compile_and_every_station_has_a_node():
    from linectl.flow import compile_flow

    for name in ["demo", "fork-example", "scenario-b-hybrid", "one-at-a-time"]:
        line = load_config(f"config/{name}.yaml")
        flow = compile_flow(line)
        assert set(flow.stations) == set(line.stations)


def test_next_after_walks_out_of_routes_and_into_joins():
    from linectl.flow import Exit, Join, StationNode, compile_flow, next_after

    line = parse_config(
        make_line(
            {"a": "cycle_s: 1", "b": "cycle_s: 1", "c": "cycle_s: 1", "d": "cycle_s: 1"},
            "[{route: {branches: [[a], [b]]}}, {fork: [[c], [d]]}]",
        )
    )
    flow = compile_flow(line)
    after_a = next_after(flow.stations["a"])
    assert not isinstance(after_a, StationNode) and after_a is flow.root.steps[1]
    assert isinstance(next_after(flow.stations["c"]), Join)
    assert isinstance(next_after(flow.root.steps[1]), Exit)


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
async def test_a_plc_that_restarts_mid_cycle_gets_its_units_again(protocol):
    """A power cycle makes the PLC forget the unit it was working on (Idle, sequence numbers
    from 0): the step is abandoned and run again, and every unit still finishes."""
    line = make_line(
        {"a": "cycle_s: 20", "b": "cycle_s: 1"},
        "[a, b]",
        protocol=protocol,
        extra="release: {count: 3}",
    )
    async with running_line(line) as run:
        await eventually(
            lambda: (
                run.sim.station("a").starts[1] == 1
                and run.sup.stations["a"].slots[0].occupant
                and run.sup.stations["a"].slots[0].occupant.phase.value == "running"
            ),
            what="unit 1 in process at a",
        )
        # A restart drops the PLC's connections, and it comes back with nothing in process.
        run.sim.servers["p0"].drop_connections()
        run.sim.plcs["p0"].power_cycle()
        await run.wait_finished(3, within=20)
        assert run.sup.finished == 3
        assert run.sim.station("a").starts[1] == 2  # run again after the restart
        assert run.sim.station("a").completions[1] == 1


def test_a_release_interval_spaces_units_entering_the_line():
    """Release every 5 s into a line that could take one every second."""
    line = make_line(
        {"a": "cycle_s: 1"}, "[a]", extra="release: {count: 6, interval_s: 5, max_wip: 4}"
    )
    times = run_virtual(line).stats.finish_times
    assert times == pytest.approx((1.0, 6.0, 11.0, 16.0, 21.0, 26.0), abs=1e-9)


async def test_a_stations_reported_state_is_the_plcs_even_when_a_command_echo_showed_it_first():
    """A RESET's echo shows Idle before the next poll does, and that poll's repeat is not
    reported again: statistics() must still say Idle, as the events and the PLC do."""
    line = SMALL.replace("line: small", "line: small\nrelease: {count: 2}")
    async with running_line(line) as run:
        await run.wait_finished(2)

        def states() -> dict[str, str]:
            return {n: st.state.label for n, st in run.sup.statistics().stations.items()}

        def plc() -> dict[str, str]:
            return {n: run.sim.station(n).status(0).state.label for n in run.sup.stations}

        await eventually(lambda: set(plc().values()) == {"Idle"}, what="the PLCs idle")
        await eventually(lambda: states() == plc(), what=f"statistics {states()} as the PLC")
