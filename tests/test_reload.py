"""SIGHUP: release settings, retry, route policies and drain lists change while the line runs;
everything else is refused with one log line."""

from __future__ import annotations

import signal

import pytest

from linectl.config import parse_config
from linectl.errors import ConfigError
from linectl.reload import apply, diff
from tests.helpers import eventually, interrupt, read_json_logs, reap, start_linectl
from tests.linefixtures import running_line
from tests.test_demo import free_ports


def line_text(
    *,
    policy: str = "round_robin",
    max_wip: int = 4,
    interval: float = 0.5,
    cycle_a: float = 1,
    drain: str = "[]",
    port: int = 0,
    extra: str = "",
) -> str:
    return f"""
line: rl
time_scale: 0.01
plcs:
  p: {{protocol: modbus, host: 127.0.0.1, port: {port}, poll_interval_s: 0.005}}
stations:
  a: {{plc: p, address: 0, cycle_s: {cycle_a}}}
  b1: {{plc: p, address: 40, cycle_s: 2}}
  b2: {{plc: p, address: 80, cycle_s: 2}}
flow: [a, {{route: {{policy: {policy}, branches: [[b1], [b2]]}}}}]
release: {{max_wip: {max_wip}, interval_s: {interval}}}
drain: {drain}
{extra}"""


def test_release_retry_policy_and_drain_are_applied():
    old = parse_config(line_text())
    new = parse_config(
        line_text(policy="least_loaded", max_wip=2, interval=1, drain="[b2]")
        + "retry: {attempts: 5}\n"
    )
    change = diff(old, new)
    assert change.refused == []
    assert "release.max_wip 4 -> 2" in change.applied
    assert "release.interval_s 0.5 -> 1.0" in change.applied
    assert "retry.attempts 3 -> 5" in change.applied
    assert "flow[1].route.policy round_robin -> least_loaded" in change.applied
    assert change.drain == {"b2"} and change.restore == set()
    assert change.line.release == new.release and change.line.flow == new.flow
    assert change.line.stations == old.stations


def test_anything_else_is_refused_and_the_rest_still_applied():
    old = parse_config(line_text())
    new = parse_config(line_text(max_wip=3, cycle_a=5).replace("time_scale: 0.01", "time_scale: 1"))
    change = diff(old, new)
    assert change.refused == ["stations.a.cycle_s", "time_scale"]
    assert change.applied == ["release.max_wip 4 -> 3"]
    assert change.line.stations == old.stations and change.line.time_scale == old.time_scale


def test_a_new_flow_shape_is_refused():
    old = parse_config(line_text())
    text = (
        line_text()
        .replace("flow: [a, {route:", "flow: [{route:")
        .replace("[[b1], [b2]]}}]", "[[b1], [b2]]}}, a]")
    )
    change = diff(old, parse_config(text))
    assert change.refused == ["flow (its stations, routes or forks)"]
    assert change.line.flow == old.flow


def test_an_unchanged_config_changes_nothing():
    old = parse_config(line_text())
    change = diff(old, parse_config(line_text()))
    assert (change.applied, change.refused) == ([], [])


def test_a_drain_of_an_unknown_station_is_a_config_error():
    with pytest.raises(ConfigError, match=r"drain\[0\]: unknown station 'b22' \(did you mean 'b2'"):
        parse_config(line_text(drain="[b22]"))


async def test_apply_changes_a_running_line():
    async with running_line(line_text()) as run:
        await run.wait_finished(2)
        new = parse_config(line_text(policy="least_loaded", max_wip=1, drain="[b2]"))
        apply(run.sup, diff(run.sup.line, new))
        assert run.sup.max_wip == 1
        assert run.sup.line.release.max_wip == 1
        assert [r.policy for r in run.sup.flow.routes] == ["least_loaded"]
        assert not run.sup.stations["b2"].in_service
        done = run.sup.finished
        await run.wait_finished(done + 2)
        assert len(run.sup.units) <= 1  # the new max_wip holds
        apply(run.sup, diff(run.sup.line, parse_config(line_text(max_wip=1))))
        assert run.sup.stations["b2"].in_service


async def test_sighup_reloads_a_running_linectl_run(tmp_path):
    """A real process: SIGHUP applies max_wip and refuses a cycle time, one line each."""
    plc, metrics, api = free_ports(3)
    extra = (
        f"storage: {{url: 'sqlite:///{tmp_path / 'rl.sqlite3'}'}}\n"
        f"metrics: {{port: {metrics}}}\napi: {{port: {api}}}\n"
    )
    config = tmp_path / "rl.yaml"
    config.write_text(line_text(port=plc, extra=extra))
    proc = await start_linectl("run", str(config), "--log-format", "json")
    seen: list[dict] = []

    async def until(text: str) -> dict:
        return await read_json_logs(proc.stderr, seen, text)

    try:
        await until("unreachable")  # running, its PLC retried
        config.write_text(line_text(port=plc, max_wip=2, cycle_a=3, extra=extra))
        proc.send_signal(signal.SIGHUP)
        applied = await until("reloaded:")
        assert "release.max_wip 4 -> 2" in applied["msg"]
        refused = await until("reload refused for")
        assert "stations.a.cycle_s" in refused["msg"] and refused["level"] == "error"
        config.write_text("line: [broken")
        proc.send_signal(signal.SIGHUP)
        broken = await until("reload refused, the config has errors")
        assert "YAML" in broken["msg"]
        await interrupt(proc)
    finally:
        await reap(proc)


async def test_the_drain_list_takes_stations_out_of_service_at_start():
    from linectl.reload import drain_at_start

    async with running_line(line_text(drain="[b1]")) as run:
        await drain_at_start(run.sup)
        assert not run.sup.stations["b1"].in_service
        await eventually(lambda: run.sup.finished >= 2, what="units through b2 alone")
