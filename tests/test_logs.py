"""Logs for machines: JSON lines with the line, station, unit and PLC; reminders for a PLC that
stays down at a slowing interval."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from linectl.logformat import JsonFormatter
from linectl.logpolicy import Reminder
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
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "linectl.cli",
        "run",
        str(config),
        "--log-format",
        "json",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    lines: list[dict] = []
    try:
        async with asyncio.timeout(20):
            while not any("unreachable" in e["msg"] for e in lines):
                raw = await proc.stderr.readline()
                assert raw, "linectl run ended early"
                if raw.startswith(b"{"):
                    lines.append(json.loads(raw))
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            rest = (await proc.communicate())[1]
        assert proc.returncode == 0, rest.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    for raw in rest.splitlines():
        if raw.startswith(b"{"):
            lines.append(json.loads(raw))
    assert all(e["line"] == "js" and {"ts", "level", "logger", "msg"} <= set(e) for e in lines)
    down = next(e for e in lines if "unreachable" in e["msg"])
    assert down["level"] == "warning"
    assert down["logger"].startswith("linectl.drivers")
