"""The line's OPC UA server, against a real asyncua client: browse, subscribe (a station's
change arrives within a publishing interval), secure by default (no anonymous client, no None
endpoint), operator methods for operators only, a port in use is one line and no crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from linectl.config import parse_config
from linectl.northbound import Northbound
from linectl.security import generate_certificate, write_certificate
from tests.helpers import eventually
from tests.linefixtures import running_line

SERVER_URI = "urn:linectl:test:northbound"
CLIENT_URI = "urn:linectl:test:scada"

LINE = """\
line: nbua
time_scale: {scale}
release: {{count: {count}}}
plcs:
  p0: {{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.005}}
stations:
  a: {{plc: p0, address: 0, cycle_s: 1}}
  b: {{plc: p0, address: 40, cycle_s: 1}}
flow: [a, b]
northbound:
  opcua:
{opcua}
"""


def line_config(opcua: str, count: int = 6, scale: float = 0.02):
    return parse_config(LINE.format(count=count, opcua=opcua, scale=scale))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nbpki")
    for name, uri in (("server", SERVER_URI), ("scada", CLIENT_URI), ("stranger", CLIENT_URI)):
        cert, key = generate_certificate(name, uri, ips=["127.0.0.1"])
        write_certificate(out, name, cert, key)
    (out / "trust").mkdir()
    (out / "trust" / "scada.der").write_bytes((out / "scada.der").read_bytes())
    return out


def secure_yaml(pki: Path) -> str:
    return f"""\
    port: 0
    security:
      certificate: {pki / "server.der"}
      private_key: {pki / "server.key.pem"}
      trust: {pki / "trust"}
      application_uri: "{SERVER_URI}"
    users:
      shift_lead: {{password_env: NB_OP_PW, role: operator}}
      viewer: {{password_env: NB_VIEW_PW}}
"""


@contextlib.asynccontextmanager
async def served(line) -> AsyncIterator[tuple[object, Northbound]]:
    async with running_line(line) as run:
        nb = Northbound(run.sup, run.sup.line)
        await nb.start()
        try:
            await asyncio.wait_for(nb.opcua.started.wait(), 20)
            # asyncua serves on a loop of its own, in its own thread, never on the line's.
            assert nb.opcua._loop is not asyncio.get_running_loop()
            yield run, nb
        finally:
            await nb.stop()


@contextlib.asynccontextmanager
async def secure_client(
    url: str, pki: Path, user: str, password: str, cert: str = "scada"
) -> AsyncIterator[Client]:
    client = Client(url, timeout=5)
    client.application_uri = CLIENT_URI
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate=str(pki / f"{cert}.der"),
        private_key=str(pki / f"{cert}.key.pem"),
        server_certificate=str(pki / "server.der"),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    client.set_user(user)
    client.set_password(password)
    async with client:
        yield client


class Changes:
    """An asyncua subscription handler keeping (node, value) of each data change."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []
        self.arrived = asyncio.Event()

    def datachange_notification(self, node, val, data) -> None:
        self.seen.append((node.nodeid.Identifier, val))
        self.arrived.set()


async def test_a_client_browses_and_sees_stations_change_within_a_publishing_interval():
    # 100 ms cycles: a station works for two publishing intervals, so no change is sampled away.
    line = line_config(
        "    port: 0\n    allow_anonymous: true\n    kpi_interval_s: 0.1", count=1000, scale=0.1
    )
    async with served(line) as (run, nb):
        url = nb.opcua.url
        async with Client(url, timeout=5) as client:
            ns = await client.get_namespace_index("urn:linectl:northbound")
            line_node = await client.nodes.objects.get_child(f"{ns}:Line")
            names = {(await n.read_browse_name()).Name for n in await line_node.get_children()}
            assert {"Finished", "WIP", "OEE", "Bottleneck", "Stations", "Units", "Pause"} <= names
            state = await line_node.get_child([f"{ns}:Stations", f"{ns}:b", f"{ns}:Condition"])
            passed = await line_node.get_child(
                [f"{ns}:Stations", f"{ns}:b", f"{ns}:Counts", f"{ns}:Passed"]
            )
            finished = await line_node.get_child(f"{ns}:Finished")
            changes = Changes()
            sub = await client.create_subscription(50, changes)
            await sub.subscribe_data_change([state, passed, finished])
            await eventually(
                lambda: (
                    {"working", "starved"}
                    <= {v for n, v in changes.seen if n == "Line.Stations.b.Condition"}
                ),
                what="station b working, then starved",
            )
            start = run.sup.finished
            await eventually(
                lambda: ("Line.Finished", start + 2) in changes.seen, what="Finished notified"
            )
            assert await passed.read_value() == run.sup.stations["b"].passed
            # Read-only: an anonymous client may neither write nor call.
            with pytest.raises(ua.UaStatusCodeError):
                await finished.write_value(ua.Variant(0, ua.VariantType.UInt64))
            pause = await line_node.get_child(f"{ns}:Pause")
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await line_node.call_method(pause, True)
            assert not run.sup.paused
            await sub.delete()
            # Time-based figures are refreshed from statistics() every kpi_interval_s.
            throughput = await line_node.get_child(f"{ns}:Throughput")
            await eventually(throughput.read_value, what="a measured throughput")
            oee = await (await line_node.get_child(f"{ns}:OEE")).read_value()
            assert 0 < oee <= 1
        assert nb.statistics().opcua_up


async def test_secure_by_default_and_methods_only_for_operators(pki, monkeypatch):
    monkeypatch.setenv("NB_OP_PW", "op-pw-for-tests")
    monkeypatch.setenv("NB_VIEW_PW", "view-pw-for-tests")
    line = line_config(secure_yaml(pki), count=2)
    async with served(line) as (run, nb):
        url = nb.opcua.url
        # No None endpoint, no anonymous login.
        endpoints = await Client(url, timeout=5).connect_and_get_server_endpoints()
        assert all(e.SecurityMode != ua.MessageSecurityMode.None_ for e in endpoints)
        assert all(
            t.TokenType != ua.UserTokenType.Anonymous
            for e in endpoints
            for t in e.UserIdentityTokens
        )
        with pytest.raises((ua.UaError, ConnectionError, TimeoutError, OSError)):
            async with Client(url, timeout=3):
                pass
        # An untrusted client certificate and a wrong password are refused.
        with pytest.raises((ua.UaError, ConnectionError, TimeoutError, OSError)):
            async with secure_client(url, pki, "shift_lead", "op-pw-for-tests", "stranger"):
                pass
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            async with secure_client(url, pki, "shift_lead", "wrong"):
                pass
        # A viewer reads but may not call; an operator calls.
        async with secure_client(url, pki, "viewer", "view-pw-for-tests") as viewer:
            ns = await viewer.get_namespace_index("urn:linectl:northbound")
            line_node = await viewer.nodes.objects.get_child(f"{ns}:Line")
            assert await (await line_node.get_child(f"{ns}:Paused")).read_value() is False
            pause = await line_node.get_child(f"{ns}:Pause")
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await line_node.call_method(pause, True)
        assert not run.sup.paused
        async with secure_client(url, pki, "shift_lead", "op-pw-for-tests") as op:
            line_node = await op.nodes.objects.get_child(f"{ns}:Line")
            await line_node.call_method(await line_node.get_child(f"{ns}:Pause"), True)
            assert run.sup.paused
            drain = await line_node.get_child(f"{ns}:Drain")
            await line_node.call_method(drain, "a", True)
            assert not run.sup.stations["a"].in_service
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidArgument"):
                await line_node.call_method(drain, "no_such_station", True)
            paused = await line_node.get_child(f"{ns}:Paused")
            await eventually(paused.read_value, what="Paused node true")


async def test_a_port_in_use_is_one_line_and_the_line_runs_on(caplog):
    line = line_config("    port: 0\n    allow_anonymous: true", count=3)
    async with served(line) as (run, nb):
        taken = line.model_copy(
            update={
                "northbound": line.northbound.model_copy(
                    update={
                        "opcua": line.northbound.opcua.model_copy(update={"port": nb.opcua.port})
                    }
                )
            }
        )
        caplog.set_level(logging.ERROR, logger="linectl.northbound")
        second = Northbound(run.sup, taken)
        await second.start()
        try:
            await asyncio.wait_for(second.opcua.started.wait(), 20)
            assert second.statistics().opcua_up is False
            await run.wait_finished(3)
        finally:
            await second.stop()
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("linectl")
    ]
    assert len(errors) == 1, errors
    assert errors[0].startswith("northbound.opcua.port: cannot listen on 127.0.0.1:")
    assert not any(r.exc_info for r in caplog.records)
