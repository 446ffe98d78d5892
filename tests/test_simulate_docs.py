"""docs/simulate.md's examples run: every linectl command in it, and its JSON body.

Where a command would take minutes in a test (an 8-hour shift, 30 times), the test runs it
shorter; the options and their spelling are the doc's."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import load_config, parse_config
from linectl.forecast_api import ForecastBody

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "simulate.md").read_text()
README = (ROOT / "README.md").read_text()


def commands(text: str, verb: str) -> list[list[str]]:
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            ctl = words[:2] == ["linectl", "ctl"] and words[3:4] == [verb]
            if words[:2] == ["linectl", verb] or ctl:
                found.append(words[1:])
    return found


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    return result


def test_every_simulate_command_runs():
    found = commands(DOC, "simulate") + commands(README, "simulate")
    assert len(found) >= 4
    shorter = {"--hours": "0.25", "--replications": "2", "--units": "60"}
    for args in found:
        args = [shorter.get(prev, word) for prev, word in zip(["", *args], args, strict=False)]
        result = invoke(args)
        if "--json" in args:
            json.loads(result.stdout)
        else:
            assert "simulated" in result.stdout


def test_the_forecast_body_is_what_the_api_takes():
    (body,) = re.findall(r"```json\n(.*?)```", DOC, re.S)
    assert ForecastBody.model_validate_json(body).replications == 10


def record_demo(url: str) -> None:
    """A demo run in virtual time at the demo's own time scale, into the store at ``url``, as
    `linectl demo` would record it (wall times in the trace, cycles at 0.1 s per line s)."""
    from linectl import virtual
    from linectl.drivers.inprocess import InProcessDriver
    from linectl.journal import Journal
    from linectl.store import TraceStore
    from linectl.supervisor import Supervisor

    line = load_config(ROOT / "config" / "demo.yaml")
    line = line.model_copy(update={"release": line.release.model_copy(update={"count": 40})})

    def factory(name, config, stations, sink):
        return InProcessDriver(name, config, stations, sink, time_scale=line.time_scale, seed=1)

    async def main() -> None:
        async with await TraceStore.open(url, line.line) as store:
            sup = Supervisor(
                line, journal=Journal(store), driver_factory=factory, exit_when_done=True
            )
            await sup.run()

    virtual.run(main())


def test_every_replay_command_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
    record_demo(url)
    what_if = tmp_path / "what-if.yaml"
    demo = (ROOT / "config" / "demo.yaml").read_text()
    what_if.write_text(
        demo.replace("    cycle_s: 20\n    capacity: 2", "    cycle_s: 20\n    capacity: 3")
    )
    assert parse_config(what_if.read_text()).stations["test"].capacity == 3
    now = datetime.now(UTC)
    window = {
        "2026-11-29T08:00": (now - timedelta(hours=1)).isoformat(),
        "2026-11-29T16:00": (now + timedelta(hours=1)).isoformat(),
    }
    found = commands(DOC, "replay")
    assert len(found) == 2
    for args in found:
        mapped = {"sqlite:///demo.sqlite3": url, "what-if.yaml": str(what_if), **window}
        result = invoke([mapped.get(word, word) for word in args])
        if "--json" in args:
            data = json.loads(result.stdout)
            assert data["units"] == 40 and data["replayed"]["finished"] > 0
        else:
            assert "recorded" in result.stdout and "replayed" in result.stdout


async def test_every_forecast_command_runs_against_a_running_demo(tmp_path):
    from linectl.api import serve_api
    from linectl.forecast_api import Forecaster
    from tests.linefixtures import running_line

    demo = (ROOT / "config" / "demo.yaml").read_text()
    line = parse_config(demo)
    fast = line.model_copy(update={"api": line.api.model_copy(update={"port": 0})})
    async with running_line(fast) as run:
        forecaster = Forecaster(run.sup)
        api = await serve_api(run.sup, run.sim.line, extend=forecaster.add_routes)
        try:
            config = tmp_path / "demo.yaml"
            config.write_text(demo + f"\napi: {{port: {api.port}}}\n")
            soon = (datetime.now().astimezone() + timedelta(minutes=2)).strftime("%H:%M")
            found = commands(DOC, "forecast")
            assert len(found) == 2
            for args in found:
                mapped = {"config/demo.yaml": str(config), "17:30": soon, "20": "4"}
                args = [mapped.get(word, word) for word in args]
                result = await asyncio.to_thread(invoke, args)
                data = json.loads(result.stdout)
                assert data["finished_by_until"]["p50"] >= data["finished_now"]
        finally:
            await api.stop()
