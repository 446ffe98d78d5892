"""linectl doctor against the bundled simulators: one line per check, exit code by the worst."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import socket
import sys
from pathlib import Path

import yaml

from linectl.config import Line, parse_config
from linectl.doctor import Finding, check_certificates, check_clock, check_ports, examine, exit_code
from linectl.security import generate_certificate, write_certificate
from linectl.store import TraceStore
from simulators.runner import SimLine

LINE = """
line: doc
time_scale: 0.01
plcs:
  m: {protocol: modbus, host: 127.0.0.1, port: 0, heartbeat_timeout_s: 0.5}
  o: {protocol: opcua, url: "opc.tcp://127.0.0.1:0", heartbeat_timeout_s: 0.5}
stations:
  a: {plc: m, address: 0, cycle_s: 1}
  b: {plc: o, address: B, cycle_s: 1}
flow: [a, b]
metrics: {port: 0}
api: {port: 0}
"""


def levels(findings: list[Finding]) -> dict[str, str]:
    return {f"{f.subject}: {f.message.split(' (')[0]}": f.level for f in findings}


async def healthy(tmp_path: Path, sim: SimLine) -> Line:
    url = f"sqlite:///{tmp_path / 'doc.sqlite3'}"
    async with await TraceStore.open(url, "doc"):
        pass
    return sim.line.model_copy(update={"storage": sim.line.storage.model_copy(update={"url": url})})


async def test_a_healthy_line_is_all_ok(tmp_path):
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.05) as sim:
        line = await healthy(tmp_path, sim)
        findings = await examine(line)
    assert exit_code(findings) == 0, "\n".join(map(str, findings))
    text = "\n".join(map(str, findings))
    for plc in ("m", "o"):
        assert f"plc {plc} " in text
    assert text.count("): reachable") == 2 and text.count("heartbeat moving") == 2
    assert re.search(r"schema version \d+,", text) and "GiB free" in text and "clock" in text


async def test_a_stopped_plc_and_a_frozen_heartbeat_fail(tmp_path):
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.05) as sim:
        line = await healthy(tmp_path, sim)
        await sim.servers["o"].stop()
        sim.plcs["m"].freeze_heartbeat(True)
        findings = await examine(line)
    assert exit_code(findings) == 2
    failed = [str(f) for f in findings if f.level == "fail"]
    assert any(f.startswith("fail  plc o ") and "unreachable" in f for f in failed), failed
    assert any(f.startswith("fail  plc m ") and "heartbeat not moving" in f for f in failed)


def test_certificates_near_expiry_warn_and_expired_ones_fail(tmp_path):
    now = dt.datetime.now(dt.UTC)
    paths = {}
    for name, days_left in (("fresh", 300), ("soon", 10), ("old", -1)):
        cert, key = generate_certificate(
            name,
            "urn:test:doc",
            not_before=now - dt.timedelta(days=30),
            not_after=now + dt.timedelta(days=days_left),
            key_size=2048,
        )
        paths[name] = write_certificate(tmp_path, name, cert, key).certificate
    key = tmp_path / "fresh.key.pem"
    text = LINE.replace(
        "heartbeat_timeout_s: 0.5}\nstations",
        "heartbeat_timeout_s: 0.5,\n      security: {certificate: "
        f"{paths['fresh']}, private_key: {key}, trust: [{paths['soon']}, {paths['old']}], "
        "application_uri: 'urn:test:doc'}}\nstations",
    )
    found = {f.subject.split()[-1]: f for f in check_certificates(parse_config(text))}
    assert found[str(paths["fresh"])].level == "ok"
    assert "days to expiry" in found[str(paths["fresh"])].message
    assert found[str(paths["soon"])].level == "warn"
    assert found[str(paths["old"])].level == "fail"
    assert "expired" in found[str(paths["old"])].message


async def test_a_port_held_by_another_program_fails_and_one_held_by_linectl_is_ok(tmp_path):
    from linectl.api import serve_api
    from linectl.dispatcher import Dispatcher
    from linectl.metrics import serve_metrics

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        line = parse_config(LINE.replace("metrics: {port: 0}", f"metrics: {{port: {port}}}"))
        (metrics, api) = await check_ports(line)
    assert metrics.level == "fail" and "taken by another program" in metrics.message
    assert api.level == "ok"
    sup = Dispatcher(parse_config(LINE))
    sup.driver_statistics = list
    server = await serve_metrics(sup, sup.line, port=0)
    api = await serve_api(sup, sup.line)
    try:
        line = parse_config(
            LINE.replace("metrics: {port: 0}", f"metrics: {{port: {server.port}}}").replace(
                "api: {port: 0}", f"api: {{port: {api.port}}}"
            )
        )
        found = await check_ports(line)
    finally:
        await server.stop()
        await api.stop()
    assert [(f.level, f.message) for f in found] == [("ok", "held by a running linectl")] * 2


def test_a_clock_behind_the_store_fails():
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    assert check_clock(now - dt.timedelta(hours=1), now).level == "ok"
    assert check_clock(None, now).level == "ok"
    behind = check_clock(now + dt.timedelta(minutes=5), now)
    assert behind.level == "fail" and "300 s behind" in behind.message
    assert check_clock(None, dt.datetime(2001, 1, 1, tzinfo=dt.UTC)).level == "fail"


async def test_the_doctor_command_in_the_docs_exits_0_on_a_live_line(tmp_path):
    """docs/service.md's `linectl doctor /etc/linectl/demo.yaml`, on simulated PLCs."""
    doc = (Path(__file__).parent.parent / "docs" / "service.md").read_text()
    (command,) = [ln for ln in doc.splitlines() if ln.startswith("linectl doctor ")]
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.05) as sim:
        line = await healthy(tmp_path, sim)
        config = tmp_path / "demo.yaml"
        config.write_text(yaml.safe_dump(line.model_dump(mode="json", exclude_none=True)))
        args = [a if a != "/etc/linectl/demo.yaml" else str(config) for a in command.split()[1:]]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "linectl.cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path.cwd())},
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    lines = out.decode().splitlines()
    assert proc.returncode == 0, out.decode() + err.decode()
    assert all(ln.startswith("ok ") for ln in lines[:-1]), lines
    assert lines[-1].endswith("all ok (" + str(len(lines) - 1) + " checks)")
