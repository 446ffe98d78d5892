"""``linectl replay``: a recorded run's own cycles, rejects and faults, replayed in virtual time
under the same or another flow."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import load_config, parse_config
from linectl.replay import replay, scripts_of
from linectl.simulate import Plan, run, run_once, virtual_line
from tests.linefixtures import SMALL as SCALED

# Recorded by virtual runs at line speed, so the config replayed says so too (a trace is
# read in the time scale of the config that recorded it).
SMALL = SCALED.replace("time_scale: 0.1\n", "")


def record(line, units: int, url: str, seed: int = 1):
    """Run ``line`` in virtual time into the trace store at ``url``; return the units read back."""
    from linectl.store import TraceStore

    plan = Plan(units=units, db=url)
    vline = virtual_line(line, plan)

    async def main():
        await run_once(vline, plan, seed=seed)
        async with await TraceStore.open(url, vline.line, create=False) as store:
            return await store.units(None, None, None, None, None)

    return vline, run(main())


def test_a_deterministic_run_replays_to_the_same_figures(tmp_path):
    line, units = record(parse_config(SMALL), 30, f"sqlite:///{tmp_path / 't.sqlite3'}")
    result = run(replay(line, units, line))
    assert result.units == 30 and result.steps == 90
    assert result.replayed.finish_times_s == result.recorded.finish_times_s
    assert result.recorded.interval_s == pytest.approx(2.0, abs=1e-6)
    assert result.recorded.utilization["b"] == pytest.approx(1.0, abs=0.01)
    assert result.replayed.utilization["b"] == pytest.approx(1.0, abs=0.01)


def test_the_demo_with_rejects_and_faults_replays_cycle_for_cycle(tmp_path):
    """The demo's own record, replayed under its own flow: the same rejects, faults and cycle
    times in the same order give the same run."""
    line, units = record(load_config("config/demo.yaml"), 60, f"sqlite:///{tmp_path / 'd.db'}")
    scripts = scripts_of(units, line.time_scale)
    assert any(code for cycles in scripts.values() for _, _, code in cycles)  # faults recorded
    assert any(r == 2 for cycles in scripts.values() for _, r, _ in cycles)  # and rejects
    result = run(replay(line, units, line, seed=99))  # no draw needed: a different seed
    # The PLC measures cycles in whole milliseconds: the replay is that close.
    assert result.replayed.finish_times_s == pytest.approx(result.recorded.finish_times_s, abs=0.05)
    assert result.replayed.quarantined == result.recorded.quarantined > 0


def test_a_second_slot_at_the_bottleneck_moves_the_bottleneck(tmp_path):
    """What would the small line have done with two b slots? a (1 s) sets the pace."""
    line, units = record(parse_config(SMALL), 30, f"sqlite:///{tmp_path / 't.sqlite3'}")
    other = parse_config(SMALL.replace("cycle_s: 2}", "cycle_s: 2, capacity: 2}"))
    result = run(replay(line, units, other))
    assert result.replayed.interval_s == pytest.approx(1.0, abs=1e-6)
    assert result.replayed.bottleneck == "a"
    assert result.recorded.bottleneck == "b"


def test_the_command_prints_recorded_beside_replayed(tmp_path):
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    record(parse_config(SMALL), 20, url)
    config = tmp_path / "small.yaml"
    config.write_text(SMALL)
    other = tmp_path / "two-b.yaml"
    other.write_text(SMALL.replace("cycle_s: 2}", "cycle_s: 2, capacity: 2}"))
    result = CliRunner().invoke(app, ["replay", str(config), "--db", url, "--flow", str(other)])
    assert result.exit_code == 0, result.output
    assert "recorded" in result.stdout and "replayed" in result.stdout
    data = json.loads(
        CliRunner().invoke(app, ["replay", str(config), "--db", url, "--json"]).stdout
    )
    assert data["units"] == 20
    assert data["replayed"]["makespan_s"] == data["recorded"]["makespan_s"]


def test_an_empty_window_gets_one_line_and_a_non_zero_exit(tmp_path):
    url = f"sqlite:///{tmp_path / 't.sqlite3'}"
    record(parse_config(SMALL), 5, url)
    config = tmp_path / "small.yaml"
    config.write_text(SMALL)
    result = CliRunner().invoke(
        app, ["replay", str(config), "--db", url, "--since", "2001-01-01", "--until", "2001-01-02"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "linectl replay: no steps of line 'small' recorded from 2001-01-01 to 2001-01-02"
    )


async def test_a_live_runs_trace_replays_near_what_it_recorded(tmp_path):
    """A line run live over sockets (spread, rejects, faults) into a SQLite trace, replayed
    under its own config. The replay has no controller latency, so it is never slower; how much
    faster depends on the machine's load while recording (23 % at a load average of 8, 69 % at
    12), so the replay is held to the line's own pace instead: the route's two 3 s stations
    pass a unit every 1.5 s, a little more with the recorded faults and rejects."""
    import asyncio

    from linectl.journal import Journal
    from linectl.store import TraceStore
    from tests.linefixtures import run_to_completion
    from tests.test_supervisor import make_line

    spec = "sim: {distribution: normal, spread: 0.1, reject_p: 0.05, fault_p: 0.03, seed: %d}"
    line = parse_config(
        make_line(
            {"a": f"cycle_s: 1, {spec % 1}", "r1": f"cycle_s: 3, {spec % 2}",
             "r2": f"cycle_s: 3, {spec % 3}", "z": f"cycle_s: 1, {spec % 4}"},
            "[a, {route: {policy: least_loaded, branches: [[r1], [r2]]}}, z]",
            time_scale=0.05,
            extra="release: {count: 30}\nretry: {attempts: 3, backoff_s: 0.5}",
        )
    )  # fmt: skip
    url = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    async with await TraceStore.open(url, line.line) as store:
        _sim, sup = await run_to_completion(line, within=40, journal=Journal(store))
        units = await store.units(None, None, None, None, None)
    assert sup.finished + len(sup.quarantined) == 30
    result = await asyncio.to_thread(run, replay(line, units, line))
    recorded, replayed = result.recorded, result.replayed
    assert result.units == 30 and not result.notes
    assert recorded.quarantined > 0
    # Rejects follow each station's sequence of cycles; routing decides how far each runs.
    assert abs(replayed.quarantined - recorded.quarantined) <= 5
    assert replayed.interval_s <= 1.05 * recorded.interval_s
    assert replayed.interval_s == pytest.approx(1.5, rel=0.2)
