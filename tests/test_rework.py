"""A station's on_reject: a rejected unit is reworked and carries on instead of being
quarantined, in the config, the analysis, a real run and a restart."""

from __future__ import annotations

import pytest

from linectl.analysis import analyze
from linectl.config import ConfigError, load_config, parse_config
from linectl.flow import compile_flow, next_after
from simulators.runner import SimLine
from tests.helpers import eventually
from tests.linefixtures import run_to_completion
from tests.test_operator_actions import supervisor
from tests.test_supervisor import make_line

STATIONS = {
    "a": "cycle_s: 1",
    "t": "cycle_s: 1, on_reject: fix, sim: {reject_p: 1.0}",
    "fix": "cycle_s: 2",
    "z": "cycle_s: 1",
}


def test_the_example_config_counts_the_rework_share():
    analysis = analyze(load_config("config/rework-example.yaml"))
    assert analysis.stations["repair"].share == pytest.approx(0.2)
    assert analysis.stations["repair"].utilization == pytest.approx(0.6)
    assert analysis.first_pass_yield == pytest.approx(1.0)  # repair rejects nothing


def test_a_rework_station_slower_than_its_share_allows_is_the_bottleneck():
    line = parse_config(make_line(STATIONS, "[a, t, z]"))
    assert analyze(line).bottleneck == "fix"  # every unit, 2 s
    assert analyze(line).interval_s == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"t": "cycle_s: 1, on_reject: fxi"}, "unknown station 'fxi' (did you mean 'fix'?)"),
        ({"t": "cycle_s: 1, on_reject: z"}, "'z' is in the flow at flow[2]"),
        ({"fix": "cycle_s: 1, on_reject: a"}, "'fix' is not in the flow"),
        (
            {"a": "cycle_s: 1, on_reject: fix"},
            "'fix' is already the rework station of",
        ),
    ],
)
def test_a_wrong_rework_station_is_one_clear_line(change, problem):
    with pytest.raises(ConfigError) as err:
        parse_config(make_line(STATIONS | change, "[a, t, z]"))
    assert any("on_reject" in e and problem in e for e in err.value.problems), err.value.problems


def test_after_rework_a_unit_goes_on_with_the_step_after_the_one_that_rejected_it():
    flow = compile_flow(parse_config(make_line(STATIONS, "[a, t, z]")))
    assert flow.stations["t"].on_reject is flow.stations["fix"]
    assert next_after(flow.stations["fix"]) is flow.stations["z"]


async def test_rejected_units_are_reworked_and_finish_instead_of_quarantine():
    line = make_line(STATIONS, "[a, t, z]", extra="release: {count: 4}")
    sim, sup = await run_to_completion(line)
    assert (sup.finished, len(sup.quarantined), sup.rejected) == (4, 0, 0)
    for unit in range(1, 5):
        assert [sim.station(n).completions[unit] for n in ("a", "t", "fix", "z")] == [1, 1, 1, 1]
    assert sup.stations["t"].rejected == 4


async def test_a_unit_in_rework_at_a_restart_carries_on_after_it(tmp_path):
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    line = make_line(STATIONS | {"fix": "cycle_s: 100"}, "[a, t, z]", extra="release: {count: 1}")
    async with SimLine(parse_config(line), free_ports=True, heartbeat_period_s=0.05) as sim:
        async with supervisor(sim.line, url, drain_timeout_s=0.05) as sup:
            await eventually(
                lambda: sup.stations["fix"].slots[0].occupant is not None, what="unit in rework"
            )
        async with supervisor(sim.line, url) as sup:
            fix = sup.stations["fix"].slots[0]
            await eventually(lambda: fix.occupant is not None, what="the unit back in rework")
            assert fix.occupant.unit.serial == "t-000001" and not sup.quarantined
            await eventually(lambda: sup.finished == 1, within=10, what="the unit to finish")
    assert sim.station("z").completions[1] == 1
    assert sim.station("t").completions[1] == 1
