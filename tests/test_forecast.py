"""Forecast: a snapshot of a running line, continued in virtual time, finishes exactly the units
the line itself finishes, for deterministic lines (routes, forks, slots, units mid-cycle)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from linectl import virtual
from linectl.config import load_config, parse_config
from linectl.forecast import ForecastError, forecast, snapshot
from linectl.simulate import Plan, virtual_line
from tests.linefixtures import SMALL


def deterministic(line):
    """The line with every station at exactly its nominal cycle: no spread, rejects, faults."""
    stations = {
        n: st.model_copy(
            update={
                "sim": st.sim.model_copy(
                    update={"spread": 0.0, "reject_p": 0.0, "fault_p": 0.0, "distribution": "fixed"}
                )
            }
        )
        for n, st in line.stations.items()
    }
    return line.model_copy(update={"stations": stations})


def live_run(line, at_s: float, horizon_s: float):
    """Run ``line`` in virtual time; take a snapshot at ``at_s``; return it and the units the
    line had finished ``horizon_s`` later."""
    from linectl.simulate import _driver_factory
    from linectl.supervisor import Supervisor

    async def main():
        loop = asyncio.get_running_loop()
        sup = Supervisor(line, driver_factory=_driver_factory(1))
        taken = []
        later = []
        loop.call_at(loop.time() + at_s, lambda: taken.append(snapshot(sup)))

        def done() -> None:
            later.append(sup.finished)
            sup.stop()

        loop.call_at(loop.time() + at_s + horizon_s, done)
        async with asyncio.timeout(at_s + horizon_s + 1000):
            await sup.run()
        return taken[0], later[0]

    return virtual.run(main())


@pytest.mark.parametrize(
    ("name", "at_s"),
    [("small", 50.3), ("config/demo.yaml", 137.7), ("config/scenario-b-hybrid.yaml", 9_000.0)],
)
def test_a_forecast_of_a_deterministic_line_is_what_the_line_does(name, at_s):
    line = parse_config(SMALL) if name == "small" else load_config(name)
    line = virtual_line(deterministic(line), Plan(units=None, hours=1))
    horizon = 5 * 3600 if "scenario" in name else 600
    snap, actual = live_run(line, at_s, horizon)
    assert snap.units and snap.in_progress  # units mid-cycle, not an empty line
    result = forecast(snap, snap.taken_at + timedelta(seconds=horizon), replications=2)
    assert result.runs == (actual, actual)
    assert result.finished_now == snap.finished < actual


def test_a_forecast_of_the_demo_has_a_spread_and_includes_what_is_done():
    line = virtual_line(load_config("config/demo.yaml"), Plan(units=None, hours=1))
    snap, actual = live_run(line, 300.0, 900)
    result = forecast(snap, snap.taken_at + timedelta(seconds=900), replications=5)
    assert len(set(result.runs)) > 1
    assert min(result.runs) > snap.finished
    assert result.quantile(0.05) <= actual * 1.1 and result.quantile(0.95) >= actual * 0.9
    data = result.to_dict()
    assert data["finished_by_until"]["p50"] == result.quantile(0.5)


def test_a_forecast_into_the_past_or_too_big_is_refused():
    line = virtual_line(parse_config(SMALL), Plan(units=None, hours=1))
    snap, _ = live_run(line, 10.0, 10.0)
    with pytest.raises(ForecastError, match="is not after now"):
        forecast(snap, snap.taken_at - timedelta(seconds=1), 1)
    with pytest.raises(ForecastError, match="replications must be 1 to 100, not 0"):
        forecast(snap, snap.taken_at + timedelta(seconds=10), 0)
    with pytest.raises(ForecastError, match="line hours of simulation"):
        forecast(snap, snap.taken_at + timedelta(days=30), 10)


# --- a live line: ctl, the operator API and the gauge ------------------------------------------


async def test_ctl_forecasts_a_live_line_and_the_gauge_shows_it(tmp_path):
    """A line on the bundled simulators over sockets: ``linectl ctl CONFIG forecast --until``
    answers with the distribution (in a child process), and /metrics then carries it."""
    from datetime import UTC, datetime

    from typer.testing import CliRunner

    from linectl.api import serve_api
    from linectl.cli import app
    from linectl.forecast_api import Forecaster
    from linectl.metrics import serve_metrics
    from tests.linefixtures import running_line
    from tests.test_api import call
    from tests.test_metrics import scrape
    from tests.test_supervisor import make_line

    text = make_line(
        {"a": "cycle_s: 1", "r1": "cycle_s: 3", "r2": "cycle_s: 3", "z": "cycle_s: 1"},
        "[a, {route: {branches: [[r1], [r2]]}}, z]",
        time_scale=0.01,
        extra="api: {port: 0}\nmetrics: {port: 0}",
    )
    async with running_line(text) as run:
        forecaster = Forecaster(run.sup)
        api = await serve_api(run.sup, run.sim.line, extend=forecaster.add_routes)
        metrics = await serve_metrics(run.sup, run.sim.line, port=0, forecaster=forecaster)
        try:
            await run.wait_finished(3)
            snap = snapshot(run.sup)  # in line seconds, whatever the time scale
            assert snap.in_progress
            for p in snap.in_progress:
                assert 0 <= p.elapsed_s <= 1.5 * run.sup.line.stations[p.station].cycle_s
            assert all(0 < u.age_s < 60 for u in snap.units)
            config = tmp_path / "line.yaml"
            config.write_text(text.replace("api: {port: 0}", f"api: {{port: {api.port}}}"))
            until = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()

            def ctl(*args: str):
                result = CliRunner().invoke(app, ["ctl", str(config), *args])
                return result.exit_code, result.stdout, result.stderr

            code, out, err = await asyncio.to_thread(
                ctl, "forecast", "--until", until, "--replications", "3"
            )
            assert code == 0, err
            data = json.loads(out)
            by = data["finished_by_until"]
            assert data["replications"] == 3 and len(by["runs"]) == 3
            # 3 s at time scale 0.01 is 300 line seconds: a unit every 1.5 s, give or take.
            assert 150 <= by["p50"] - data["finished_now"] <= 210
            text_metrics = await scrape(metrics.port)
            assert 'linectl_forecast_units{line="t",quantile="0.5"}' in text_metrics

            status, answer = await asyncio.to_thread(
                call, api.port, "POST", "/forecast", {"until": "not a time"}
            )
            assert status == 400 and "is not HH:MM or an ISO 8601 time" in answer["error"]
            code, _out, err = await asyncio.to_thread(ctl, "forecast")
            assert code == 2 and "needs --until" in err
        finally:
            await metrics.stop()
            await api.stop()


def test_until_hh_mm_is_the_next_such_time():
    from datetime import datetime

    from linectl.forecast_api import parse_until

    now = datetime(2026, 11, 29, 22, 30).astimezone()
    assert parse_until("23:15", now) == now.replace(hour=23, minute=15)
    assert parse_until("06:00", now) == now.replace(hour=6, minute=0) + timedelta(days=1)
    with pytest.raises(ValueError, match="'25:00' is not HH:MM"):
        parse_until("25:00", now)
