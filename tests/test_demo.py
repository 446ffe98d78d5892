"""The README's first command: `linectl demo` runs a line, serves metrics, stops on Ctrl-C."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
from pathlib import Path

from tests.helpers import eventually, interrupt, read_line_with, reap, start_linectl


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def demo_config(tmp_path: Path) -> Path:
    """config/demo.yaml on free ports, ten times faster."""
    text = Path("config/demo.yaml").read_text()
    modbus, opcua, metrics, api = free_ports(4)
    text = text.replace("port: 15020", f"port: {modbus}")
    text = text.replace("opc.tcp://127.0.0.1:14840", f"opc.tcp://127.0.0.1:{opcua}")
    text = re.sub(r"(?m)^time_scale: .*$", "time_scale: 0.01", text)
    text += f"\nmetrics: {{port: {metrics}}}\napi: {{port: {api}}}\n"
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def finished(url: str) -> float:
    with urllib.request.urlopen(url, timeout=2) as reply:
        body = reply.read().decode()
    match = re.search(r'^linectl_units_finished_total\{line="demo"\} (\S+)$', body, re.M)
    return float(match.group(1)) if match else 0.0


async def test_demo_runs_units_serves_metrics_and_stops_cleanly_on_ctrl_c(tmp_path):
    config = demo_config(tmp_path)
    proc = await start_linectl("demo", str(config), cwd=tmp_path)
    try:
        line = await read_line_with(proc.stdout, "metrics http")
        url = re.search(r"metrics (http://\S+/metrics)", line).group(1)
        view = re.search(r"line view (http://\S+/)", line).group(1)
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(view, timeout=2).read())
        assert b"/static/lineview.js" in page  # the live line view is served
        await eventually(lambda: finished(url) >= 3, within=20, what="3 units through the demo")
        out, _ = await interrupt(proc)
        assert "units/h" in out  # the live board was drawn
        assert "constraint" in out  # with the measured constraint
        assert (tmp_path / "demo.sqlite3").exists()  # the embedded trace database
    finally:
        await reap(proc)
