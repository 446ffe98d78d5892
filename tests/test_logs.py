"""Logs for machines: JSON lines with the line, station, unit and PLC; reminders for a PLC that
stays down at a slowing interval."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys

import pytest

from linectl.logformat import JsonFormatter
from linectl.logpolicy import Reminder
from tests.helpers import interrupt, read_json_logs, reap, start_linectl
from tests.test_demo import free_ports


def record(msg: str, *args, level=logging.WARNING, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("linectl.supervisor", level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_line_has_time_level_logger_message_and_the_fields_that_apply():
    out = json.loads(
        JsonFormatter("demo").format(
            record("unit %s quarantined", "demo-000007", unit="demo-000007", station="test")
        )
    )
    assert out["level"] == "warning"
    assert out["logger"] == "linectl.supervisor"
    assert out["msg"] == "unit demo-000007 quarantined"
    assert (out["line"], out["unit"], out["station"]) == ("demo", "demo-000007", "test")
    assert out["ts"].endswith("+00:00")
    assert "plc" not in out  # only the fields that apply


def test_a_traceback_stays_inside_one_json_line():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    text = JsonFormatter().format(rec)
    assert "\n" not in text
    assert "RuntimeError: boom" in json.loads(text)["exc"]


def test_reminders_slow_down_to_the_cap_and_stop_after_recovery():
    reminder = Reminder(first_s=60, factor=2, max_s=3600)
    # A reconnect attempt every 0.5 s for a day.
    due = [t / 2 for t in range(0, 2 * 86400) if reminder.due(t / 2)]
    assert due[:5] == [60, 180, 420, 900, 1860]  # 1, 2, 4, 8, 16 minutes apart
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert max(gaps) == 3600 and gaps[-1] == 3600
    assert len(due) < 30  # not a flood: 172 800 attempts, fewer than 30 lines
    reminder.reset()
    assert not reminder.due(90_000)  # a new outage starts its own schedule
    assert reminder.due(90_060)


def test_reminder_settings_are_checked():
    with pytest.raises(ValueError, match="first_s > 0"):
        Reminder(first_s=0)


async def test_run_with_json_logs_writes_one_object_per_line(tmp_path):
    """A PLC nobody answers: `linectl run --log-format json` logs it unreachable as JSON."""
    plc, metrics, api = free_ports(3)
    config = tmp_path / "line.yaml"
    config.write_text(
        f"""
line: js
plcs:
  cell: {{protocol: modbus, host: 127.0.0.1, port: {plc}, backoff_max_s: 0.2}}
stations:
  a: {{plc: cell, address: 0, cycle_s: 1}}
flow: [a]
storage: {{url: "sqlite:///{tmp_path / "t.sqlite3"}"}}
metrics: {{port: {metrics}}}
api: {{port: {api}}}
"""
    )
    proc = await start_linectl("run", str(config), "--log-format", "json")
    lines: list[dict] = []
    try:
        await read_json_logs(proc.stderr, lines, "unreachable")
        _, rest = await interrupt(proc)
    finally:
        await reap(proc)
    for raw in rest.splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    assert all(e["line"] == "js" and {"ts", "level", "logger", "msg"} <= set(e) for e in lines)
    down = next(e for e in lines if "unreachable" in e["msg"])
    assert down["level"] == "warning"
    assert down["logger"].startswith("linectl.drivers")
    assert down["plc"] == "cell"  # the driver core names the PLC in its log lines


def test_a_plc_that_stays_down_is_reminded_of_at_a_slowing_interval(caplog):
    """An hour unreachable, a reconnect attempt every 0.2-0.4 s: one 'unreachable' line, then
    reminders after about 1, 3, 7, 15, 31 minutes; one 'recovered' line when it is back."""
    import contextlib

    from linectl.config import parse_config
    from linectl.drivers.inprocess import InProcessDriver
    from tests.virtualtime import run_virtual

    line = parse_config(
        "line: r\nplcs:\n  p: {protocol: modbus, host: 127.0.0.1, port: 502, "
        "backoff_initial_s: 0.2, backoff_max_s: 0.4}\n"
        "stations:\n  a: {plc: p, address: 0, cycle_s: 1}\nflow: [a]\n"
    )

    async def main():
        loop = asyncio.get_running_loop()
        driver = InProcessDriver("p", line.plcs["p"], dict(line.stations), lambda e: None)
        driver.set_reachable(False)
        task = asyncio.create_task(driver.run())
        try:
            await asyncio.sleep(3600)
            driver.set_reachable(True)
            async with asyncio.timeout(5):
                await driver.wait_connected()
            return loop.time()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.WARNING, logger="linectl.drivers"):
        run_virtual(main)
    said = [r for r in caplog.records if r.name == "linectl.drivers"]
    texts = [r.getMessage() for r in said]
    assert sum("unreachable:" in t and "after" not in t for t in texts) == 1
    reminders = [t for t in texts if "still unreachable after" in t]
    assert 5 <= len(reminders) <= 6, texts  # 1, 3, 7, 15, 31 (and 63 > 60) minutes
    assert sum("recovered after" in t for t in texts) == 1
    assert all(getattr(r, "plc", None) == "p" for r in said)


def test_backoff_stays_at_its_maximum_through_thousands_of_attempts():
    """A PLC down for days: the retry delay stays capped instead of overflowing a float."""
    from linectl.drivers.base import Backoff

    backoff = Backoff(0.2, 10.0, rng=lambda: 1.0)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert delays[0] == 0.2 and delays[-1] == 10.0
