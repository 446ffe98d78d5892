"""``linectl sim`` as a real process, and the HTTP control interface it serves.

The process tests run the bundled config/demo.yaml with ``--free-ports`` and read the ports it
prints, so they never race another process for a port. Faults injected over HTTP are observed
with a plain pymodbus client (tests/raw_modbus.py), not with linectl's driver.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from linectl.config import load_config, parse_config
from linectl.contract import S_STATE, Command, State, slot_base
from simulators.control import ControlServer
from simulators.runner import SimLine
from tests.helpers import eventually
from tests.raw_modbus import RawModbus

DEMO = Path(__file__).parent.parent / "config" / "demo.yaml"
ROW = re.compile(r"^(\S+)\s+(modbus|opcua)\s+(\S+)\s+(\d+) stations?$")


async def http(url: str, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """One request with a stock HTTP client (urllib, in a thread): (status, JSON reply)."""
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(
        url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )

    def send() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(send)


class SimProcess:
    """A running ``linectl sim`` and what it printed before 'ready'."""

    def __init__(self, proc: asyncio.subprocess.Process, rows: dict[str, tuple[str, str, int]]):
        self.proc = proc
        self.rows = rows  # plc -> (protocol, where, stations)
        self.url = ""

    @classmethod
    async def start(cls, *args: str, within: float = 10.0) -> SimProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "linectl.cli",
            "sim",
            str(DEMO),
            "--free-ports",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self = cls(proc, {})
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(within):
                while True:
                    line = (await proc.stdout.readline()).decode()
                    if not line:
                        _, err = await proc.communicate()
                        raise AssertionError(f"linectl sim ended before 'ready': {err.decode()}")
                    line = line.rstrip("\n")
                    if line.startswith("ready"):
                        return self
                    if line.startswith("control "):
                        self.url = line.split()[1]
                    elif m := ROW.match(line):
                        self.rows[m[1]] = (m[2], m[3], int(m[4]))
                    else:
                        raise AssertionError(f"unexpected line from linectl sim: {line!r}")
        except BaseException:
            await self.kill()
            raise

    def line(self):
        """The demo config with the ports this process really listens on."""
        cfg = load_config(DEMO)
        plcs = {}
        for name, plc in cfg.plcs.items():
            where = self.rows[name][1]
            if plc.protocol == "modbus":
                plcs[name] = plc.model_copy(update={"port": int(where.rsplit(":", 1)[1])})
            else:
                plcs[name] = plc.model_copy(update={"url": where})
        return cfg.model_copy(update={"plcs": plcs})

    async def stop(self, sig: int, within: float = 5.0) -> tuple[int, str]:
        self.proc.send_signal(sig)
        async with asyncio.timeout(within):
            _, err = await self.proc.communicate()
        return self.proc.returncode, err.decode()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.communicate()


@pytest.fixture
async def sim_process():
    process = await SimProcess.start()
    try:
        yield process
    finally:
        await process.kill()


async def test_sim_prints_each_plc_injects_faults_over_http_and_exits_0_on_sigterm(sim_process):
    """The whole life of ``linectl sim``: ready line, a fault a Modbus client sees, counters that
    follow real cycles, a clear 404, and a clean exit on SIGTERM."""
    proc = sim_process
    assert proc.rows["cell_a"][0::2] == ("modbus", 4)
    assert proc.rows["cell_b"][0::2] == ("opcua", 3)
    assert proc.url.startswith("http://127.0.0.1:")

    status, reply = await http(proc.url, "POST", "/fault", {"station": "kitting", "code": 7})
    assert (status, reply["state"], reply["fault_code"]) == (200, "Aborted", 7)
    raw = await RawModbus.open(proc.line(), "cell_a")
    try:
        shown = await raw.status("kitting", 0)
        assert (shown.state, shown.fault_code) == (State.ABORTED, 7)
        # A real cycle (pack: 6 s at time_scale 0.1) shows up in the counters.
        await raw.command("pack", 0, 1, Command.START, 5)

        async def complete():
            return (await raw.status("pack", 0)).state == State.COMPLETE

        await eventually(complete, within=3.0, what="pack to complete unit 5")
    finally:
        await raw.close()
    status, counters = await http(proc.url, "GET", "/counters")
    assert status == 200
    assert counters["starts"]["pack"] == {"5": 1}
    assert counters["completions"]["pack"] == {"5": 1}
    assert counters["completions"]["kitting"] == {}
    assert counters["aborts"]["kitting"] == {}  # it held no unit when it faulted

    status, reply = await http(proc.url, "POST", "/drop", {"plc": "cell_c"})
    assert status == 404
    assert "unknown plc 'cell_c'" in reply["error"]

    code, err = await proc.stop(signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err


async def test_ctrl_c_stops_the_simulators_with_exit_code_0(sim_process):
    code, err = await sim_process.stop(signal.SIGINT)
    assert code == 0, err
    assert "Traceback" not in err


# --- the control server in-process ------------------------------------------------------------

LINE = """
line: control
time_scale: 0.01
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 0}
stations:
  a: {plc: p, address: 0, cycle_s: 1.0, capacity: 2}
  b: {plc: p, address: 40, cycle_s: 1.0}
flow: [a, b]
"""


@pytest.fixture
async def control():
    async with (
        SimLine(parse_config(LINE), free_ports=True, heartbeat_period_s=0.005) as sim,
        ControlServer(sim) as server,
    ):
        yield sim, server


async def test_a_fault_aborts_the_named_slot_with_the_code_or_the_configured_default(control):
    sim, server = control
    status, _ = await http(server.url, "POST", "/fault", {"station": "a", "slot": 1, "code": 9})
    assert status == 200
    status, reply = await http(server.url, "POST", "/fault", {"station": "b"})
    assert (status, reply["fault_code"]) == (200, 1)  # SimSpec.fault_code
    a = sim.station("a")
    assert (a.status(0).state, a.status(1).state, a.status(1).fault_code) == (
        State.IDLE,
        State.ABORTED,
        9,
    )


async def test_freeze_stops_the_plc_heartbeat_until_thawed(control):
    sim, server = control
    plc = sim.plcs["p"]
    status, _ = await http(server.url, "POST", "/freeze", {"plc": "p"})
    assert (status, plc.heartbeat_frozen) == (200, True)
    status, _ = await http(server.url, "POST", "/freeze", {"plc": "p", "frozen": False})
    assert (status, plc.heartbeat_frozen) == (200, False)


async def test_drop_closes_every_client_connection(control):
    sim, server = control
    raw = await RawModbus.open(sim.line, "p")
    try:
        await eventually(lambda: sim.servers["p"].client_count == 1, what="client connected")
        status, _ = await http(server.url, "POST", "/drop", {"plc": "p"})
        assert status == 200
        await eventually(lambda: sim.servers["p"].client_count == 0, what="connection dropped")
    finally:
        await raw.close()


async def test_violate_state_shows_a_code_outside_the_contract(control):
    sim, server = control
    status, reply = await http(server.url, "POST", "/violate", {"station": "b", "kind": "state"})
    assert (status, reply["state"]) == (200, 99)
    raw = await RawModbus.open(sim.line, "p")
    try:
        assert (await raw.read(slot_base(40, 0) + S_STATE, 1)) == [99]
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/fault", {"station": "c"}, 404, "unknown station 'c'"),
        ("POST", "/freeze", {"plc": "q"}, 404, "unknown plc 'q'"),
        ("POST", "/fault", {"station": "a", "slot": 2}, 400, "'slot' must be an integer in 0..1"),
        ("POST", "/fault", {"station": "a", "code": 0}, 400, "'code' must be an integer in 1.."),
        ("POST", "/violate", {"station": "a", "kind": "x"}, 400, "'kind' must be one of"),
        ("POST", "/freeze", {"plc": "p", "frozen": "yes"}, 400, "'frozen' must be true or false"),
        ("POST", "/drop", {}, 400, "'plc'"),
        ("POST", "/fault", b"{not json", 400, "not JSON"),
        ("POST", "/fault", [1], 400, "JSON object"),
        ("GET", "/fault", None, 405, "use POST"),
        ("GET", "/nowhere", None, 404, "no route GET /nowhere"),
    ],
)
async def test_a_bad_request_is_answered_with_a_json_error_naming_the_problem(
    control, method, path, body, status, says
):
    _, server = control
    got, reply = await http(server.url, method, path, body)
    assert got == status
    assert says in reply["error"]
