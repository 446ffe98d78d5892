"""Running under systemd: the notify protocol on a real datagram socket, a watchdog that stops
pinging when the dispatch loop hangs, and a unit file that systemd-analyze accepts."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from linectl.app import run_line
from linectl.config import parse_config
from linectl.dispatcher import Dispatcher
from linectl.sdnotify import Notifier
from linectl.service import watch
from simulators.runner import SimLine

LINE = """
line: svc
time_scale: 0.01
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.005}
stations:
  a: {plc: p, address: 0, cycle_s: 1}
  b: {plc: p, address: 40, cycle_s: 1}
flow: [a, b]
"""


class Listener:
    """The service manager's end: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def next(self, within: float = 5.0) -> dict[str, str]:
        async with asyncio.timeout(within):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.messages.append(fields)
        return fields

    async def until(self, key: str, within: float = 5.0) -> dict[str, str]:
        async with asyncio.timeout(within):
            while True:
                fields = await self.next(within)
                if key in fields:
                    return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path):
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = tmp_path / "n"
    made = Listener(str(path) if len(str(path)) < 100 else f"@linectl-test-{os.getpid()}")
    yield made
    made.close()


async def test_notifier_sends_one_datagram_per_message_to_a_path(listener):
    notifier = Notifier(listener.address)
    try:
        assert notifier.ready("line x: running\nsecond line")
        assert await listener.next() == {"READY": "1", "STATUS": "line x: running second line"}
        notifier.watchdog()
        assert await listener.next() == {"WATCHDOG": "1"}
    finally:
        notifier.close()


async def test_notifier_reaches_an_abstract_socket():
    listener = Listener(f"@linectl-test-abstract-{os.getpid()}")
    notifier = Notifier(listener.address)
    try:
        notifier.stopping()
        assert await listener.next() == {"STOPPING": "1"}
    finally:
        notifier.close()
        listener.close()


def test_watchdog_period_is_read_only_for_this_process():
    me = str(os.getpid())
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env({}) is None
    assert Notifier.from_env(env).watchdog_s == 30.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": me}).watchdog_s == 30.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_s is None
    with pytest.raises(ValueError, match="NOTIFY_SOCKET 'relative'"):
        Notifier("relative")


async def test_failed_send_is_counted_not_raised(tmp_path):
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    try:
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        assert notifier.failed == 2
    finally:
        notifier.close()


async def test_run_line_is_ready_once_running_pings_the_watchdog_and_says_stopping(
    listener, monkeypatch, tmp_path
):
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    sups = []
    async with SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.05) as sim:
        task = asyncio.create_task(
            run_line(
                sim.line,
                db_url=f"sqlite:///{tmp_path / 'svc.sqlite3'}",
                metrics=False,
                api=False,
                on_ready=lambda sup, _where: sups.append(sup),
            )
        )
        try:
            ready = await listener.until("READY", within=10)
            assert ready["STATUS"].startswith("line svc:")
            for _ in range(3):
                await listener.until("WATCHDOG", within=5)
            sups[0].stop()
            stopping = await listener.until("STOPPING", within=15)
            assert "finished" in stopping["STATUS"]
            await task
        finally:
            if not task.done():
                sups[0].stop()
                await task


class DispatchStandIn:
    """A dispatcher whose loop can be hung: a kick runs a pass on the event loop, unless hung."""

    def __init__(self) -> None:
        self.passes = 0
        self.hung = False

    def kick(self) -> None:
        if not self.hung:
            asyncio.get_running_loop().call_soon(self._pass)

    def _pass(self) -> None:
        self.passes += 1

    def statistics(self):
        return Dispatcher(parse_config(LINE)).statistics()


async def test_a_hung_dispatch_loop_stops_the_pings_and_a_live_one_resumes_them(listener):
    notifier = Notifier(listener.address, watchdog_usec=100_000)  # ping every 0.05 s
    sup = DispatchStandIn()
    task = asyncio.create_task(watch(sup, notifier))
    try:
        await listener.until("READY")
        await listener.until("WATCHDOG")
        sup.hung = True
        # A pass asked for just before the hang may still ping once; then silence.
        pings = 0
        with pytest.raises(TimeoutError):
            while True:
                await listener.until("WATCHDOG", within=0.5)  # ten periods
                pings += 1
        assert pings <= 1
        sup.hung = False
        await listener.until("WATCHDOG", within=2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()


UNIT = Path(__file__).parent.parent / "deploy" / "linectl@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    # verify insists the ExecStart binary exists: point it at this checkout's linectl.
    linectl = Path(sys.executable).parent / "linectl"
    text = UNIT.read_text().replace("/opt/linectl/bin/linectl", str(linectl))
    unit = tmp_path / "linectl@demo.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # Bad values are only warnings to verify; a clean unit gives none about itself.
    assert "linectl@" not in done.stderr, done.stderr


def test_unit_file_is_hardened():
    text = UNIT.read_text()
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=linectl",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/linectl",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "--log-format json",
    ):
        assert setting in text, setting
