"""Modbus/TCP Security (TLS, mutual auth) and the write allow-list, on real sockets.

Certificates come from linectl.security (the CAs) and a small issuer below (the leaf
certificates a CA signs), written once per module.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from linectl.config import Line, parse_config
from linectl.contract import HEADER_WORDS, S_STATE, Command, State, command_address
from linectl.drivers import modbus_wire
from linectl.drivers.base import ConnectionChange
from linectl.drivers.modbus import WriteArea, write_allow_list
from linectl.errors import ConfigError, ProtocolViolation
from linectl.tls import client_context
from simulators.runner import SimLine
from tests.helpers import eventually
from tests.linefixtures import run_to_completion
from tests.test_modbus_driver import running, stations_of


def tls_line(pki: Path, *, tls: str | None = None, sim: bool = True, count: int = 0) -> Line:
    """Two stations on PLC 'p' over TLS; the simulator's side is plc.pem, trusting ca.pem."""
    if tls is None:
        tls = f"ca: {pki}/ca.pem, certificate: {pki}/linectl.pem, private_key: {pki}/linectl.key"
    if sim:
        tls += (
            f", sim: {{certificate: {pki}/plc.pem, private_key: {pki}/plc.key, "
            f"client_ca: {pki}/ca.pem}}"
        )
    release = f"release: {{count: {count}}}" if count else ""
    return parse_config(
        f"""
line: modbus_tls
time_scale: 0.01
plcs:
  p: {{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.01, timeout_s: 0.3,
       connect_timeout_s: 0.5, heartbeat_timeout_s: 1, backoff_initial_s: 0.05,
       backoff_max_s: 0.1, tls: {{{tls}}}}}
stations:
  s1: {{plc: p, address: 0, cycle_s: 1.0}}
  s2: {{plc: p, address: 24, cycle_s: 1.0, capacity: 2}}
flow: [s1, s2]
{release}
"""
    )


def with_plc(line: Line, **update) -> Line:
    """``line`` as a client sees it: PLC 'p' with some settings changed."""
    plcs = {"p": line.plcs["p"].model_copy(update=update)}
    return line.model_copy(update={"plcs": plcs})


async def refused(line: Line, within: float = 2.0) -> str:
    """Run the driver against ``line`` until its connect fails; return why."""
    async with running(line, connected=False) as (driver, events):
        reason = await eventually(
            lambda: driver.statistics().last_error, within=within, what="a failed connect"
        )
        assert not driver.connected
        # The outage is told once, with the same reason, and nothing else.
        assert [(type(e), e.connected) for e in events.seen] == [(ConnectionChange, False)]
    return reason


# --- configuration and contexts --------------------------------------------------------------


def test_a_client_context_verifies_the_plc_and_refuses_old_tls(pki):
    tls = tls_line(pki).plcs["p"].tls
    ctx = client_context(tls)
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_key_password_in_the_config_is_refused(pki):
    tls = f"ca: {pki}/ca.pem, certificate: a.pem, private_key: a.key, password: hunter2"
    with pytest.raises(ConfigError, match=r"plcs\.p\.tls: a key password must not be written"):
        tls_line(pki, tls=tls, sim=False)


def test_an_unusable_certificate_file_is_a_config_error_naming_the_field(pki):
    tls = f"ca: {pki}/ca.pem, certificate: {pki}/plc.pem, private_key: {pki}/linectl.key"
    with pytest.raises(ConfigError, match=r"plcs.p.tls.certificate: .*linectl.key is not the key"):
        client_context(tls_line(pki, tls=tls).plcs["p"].tls, "plcs.p.tls")


def test_an_encrypted_key_is_read_with_the_password_from_the_named_variable(pki, monkeypatch):
    key = serialization.load_pem_private_key((pki / "linectl.key").read_bytes(), None)
    locked = pki / "linectl-locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    base = f"ca: {pki}/ca.pem, certificate: {pki}/linectl.pem, private_key: {locked}"
    without = tls_line(pki, tls=base, sim=False).plcs["p"].tls
    with pytest.raises(ConfigError, match=r"is encrypted; name the environment variable"):
        client_context(without, "plcs.p.tls")  # an error, never a prompt on the terminal
    named = tls_line(pki, tls=base + ", private_key_password_env: KEY_PW", sim=False)
    with pytest.raises(ConfigError, match=r"variable KEY_PW is not set or empty"):
        client_context(named.plcs["p"].tls, "plcs.p.tls")
    monkeypatch.setenv("KEY_PW", "wrong")
    wrong = r"cannot decrypt .*locked.key with the password in KEY_PW"
    with pytest.raises(ConfigError, match=wrong):
        client_context(named.plcs["p"].tls, "plcs.p.tls")
    monkeypatch.setenv("KEY_PW", "s3cret")
    assert client_context(named.plcs["p"].tls).verify_mode == ssl.CERT_REQUIRED


async def test_an_unreadable_certificate_file_is_told_at_connect_naming_the_field(pki):
    tls = f"ca: {pki}/missing.pem, certificate: {pki}/linectl.pem, private_key: {pki}/linectl.key"
    reason = await refused(tls_line(pki, tls=tls, sim=False))
    assert reason == (
        f"plc 'p' (127.0.0.1:0): TLS: plcs.p.tls.ca: cannot use {pki}/missing.pem as CA "
        "certificates: No such file or directory"
    )


def _doc_blocks() -> list[str]:
    """The indented blocks of docs/security.md's Modbus/TCP Security section."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    section = doc.split("\n## Modbus/TCP Security\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"(?:^|\n\n)((?:    .*\n|\n)+)", section)
    return [textwrap.dedent(b).strip() + "\n" for b in blocks]


def test_the_examples_in_docs_security_md_are_valid_configs():
    blocks = _doc_blocks()
    (plcs,) = [b for b in blocks if b.startswith("plcs:")]
    (sim,) = [b for b in blocks if b.startswith("tls:")]
    rest = "stations:\n  s1: {plc: cell_b, address: 0, cycle_s: 1}\nflow: [s1]\n"
    doc = "docs/security.md"
    tls = parse_config(f"line: doc\n{plcs}{rest}", doc).plcs["cell_b"].tls
    assert tls is not None and tls.ca == Path("docs/pki/plant-ca.pem")
    plc = "plcs:\n  cell_b:\n    protocol: modbus\n    host: 127.0.0.1\n" + textwrap.indent(
        sim, "    "
    )
    tls = parse_config(f"line: doc\n{plc}{rest}", doc).plcs["cell_b"].tls
    assert tls is not None and tls.sim is not None
    assert any(b.startswith("linectl certs linectl-cell-b") for b in blocks)


def test_the_allow_list_is_the_command_area_of_every_slot():
    line = parse_config(
        """
line: t
plcs: {p: {protocol: modbus, host: 127.0.0.1}}
stations:
  s1: {plc: p, address: 0, cycle_s: 1.0}
  s2: {plc: p, address: 24, cycle_s: 1.0, capacity: 2}
flow: [s1, s2]
"""
    )
    assert write_allow_list(stations_of(line)) == (
        WriteArea(8, 14, "s1", 0),
        WriteArea(32, 38, "s2", 0),
        WriteArea(48, 54, "s2", 1),
    )


# --- on the wire -------------------------------------------------------------------------------


async def test_a_command_round_trip_over_mutual_tls(pki):
    async with SimLine(tls_line(pki), free_ports=True, heartbeat_period_s=0.005) as sim:
        server = sim.servers["p"]
        assert server.sslctx is not None and server.sslctx.verify_mode == ssl.CERT_REQUIRED
        async with running(sim.line) as (driver, events):
            await driver.command("s2", 1, 1, Command.START, 42)
            done = await events.slot("s2", State.COMPLETE, slot=1)
            assert done.status.unit == 42
        assert sim.station("s2").completions[42] == 1
        assert server.connections_accepted == 1


async def test_self_signed_certificates_pinned_both_ways_as_linectl_certs_makes_them(pki):
    tls = (
        f"ca: {pki}/plc-self.der, certificate: {pki}/linectl-self.der, "
        f"private_key: {pki}/linectl-self.key.pem, min_version: TLSv1.3, "
        f"sim: {{certificate: {pki}/plc-self.der, private_key: {pki}/plc-self.key.pem, "
        f"client_ca: {pki}/linectl-self.der}}"
    )
    async with SimLine(tls_line(pki, tls=tls, sim=False), free_ports=True) as sim:
        async with running(sim.line) as (driver, events):
            await driver.command("s1", 0, 1, Command.START, 7)
            await events.slot("s1", State.COMPLETE)


@pytest.mark.parametrize(
    ("update", "why"),
    [
        (
            {"ca": "other.pem"},
            "certificate verify failed: self-signed certificate in certificate chain "
            "(the PLC's certificate is not issued by a CA in tls.ca)",
        ),
        (
            {"server_hostname": "plc.invalid"},
            "certificate verify failed: Hostname mismatch, certificate is not valid for "
            "'plc.invalid'. (set tls.server_hostname to a name in the PLC's certificate)",
        ),
    ],
    ids=["wrong-ca", "wrong-name"],
)
async def test_linectl_refuses_a_plc_it_cannot_verify(pki, update, why):
    async with SimLine(tls_line(pki), free_ports=True) as sim:
        tls = sim.line.plcs["p"].tls
        update = {k: pki / v if k == "ca" else v for k, v in update.items()}
        line = with_plc(sim.line, tls=tls.model_copy(update=update))
        reason = await refused(line)
        port = sim.servers["p"].port
        assert reason == f"plc 'p' (127.0.0.1:{port}): TLS: {why}"
        assert sum(sim.servers["p"].requests.values()) == 0


async def test_the_plc_refuses_a_client_without_a_certificate(pki, monkeypatch):
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(pki / "ca.pem")
    monkeypatch.setattr(modbus_wire, "client_context", lambda tls, path: bare)
    async with SimLine(tls_line(pki), free_ports=True) as sim:
        reason = await refused(sim.line)
        assert "the PLC closed the connection after the TLS handshake, before answering: it " in (
            reason
        )
        assert "refused our certificate (is plcs.p.tls.certificate issued by a CA" in reason
        assert sum(sim.servers["p"].requests.values()) == 0


async def test_the_plc_refuses_a_client_certificate_from_a_ca_it_does_not_trust(pki):
    async with SimLine(tls_line(pki), free_ports=True) as sim:
        tls = sim.line.plcs["p"].tls.model_copy(
            update={"certificate": pki / "rogue.pem", "private_key": pki / "rogue.key"}
        )
        reason = await refused(with_plc(sim.line, tls=tls))
        assert "before answering: it refused our certificate" in reason
        server = sim.servers["p"]
        assert sum(server.requests.values()) == server.connections_accepted == 0
        assert server.client_count == 0


async def test_a_plaintext_client_fails_fast_on_a_tls_port(pki):
    async with SimLine(tls_line(pki), free_ports=True) as sim:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reason = await refused(with_plc(sim.line, tls=None), within=1.0)
        assert loop.time() - started < 1.0
        assert reason.endswith(
            "the PLC closed the connection before answering: does this port expect TLS "
            "(Modbus/TCP Security)? Then configure plcs.p.tls"
        )
        assert sum(sim.servers["p"].requests.values()) == 0


async def test_a_tls_client_fails_within_its_connect_deadline_on_a_plaintext_port(pki):
    line = tls_line(pki, sim=False)
    async with SimLine(with_plc(line, tls=None), free_ports=True) as sim:
        client = with_plc(sim.line, tls=line.plcs["p"].tls, connect_timeout_s=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reason = await refused(client, within=1.0)
        assert loop.time() - started < 0.3 + 0.4  # the deadline plus the first poll's jitter
        assert reason.endswith(
            "TLS handshake: no answer within 0.3 s (a plaintext Modbus TCP port?)"
        )


async def test_a_write_outside_the_allow_list_is_refused_before_it_is_sent(pki):
    async with SimLine(tls_line(pki), free_ports=True, heartbeat_period_s=0.005) as sim:
        server = sim.servers["p"]
        async with running(sim.line) as (driver, _):
            status_register = HEADER_WORDS + S_STATE  # s1 slot 0's state: the PLC's to write
            attempts = {
                (status_register, 1): "nearest: station 's1' slot 0, registers 8..13",
                (0, 6): "nearest: station 's1' slot 0, registers 8..13",  # the header
                (command_address(24, 1) + 2, 6): "nearest: station 's2' slot 1, registers 48..53",
                (command_address(24, 2), 6): "nearest: station 's2' slot 1, registers 48..53",
            }
            writes, evaluated = server.requests["write"], sim.station("s1").commands_evaluated
            where = f"plc 'p' (127.0.0.1:{server.port})"
            for (address, count), nearest in attempts.items():
                with pytest.raises(ProtocolViolation) as refusal:
                    await driver._write(address, [1] * count, "test")
                assert str(refusal.value) == (
                    f"{where}: test: write of registers {address}..{address + count - 1} "
                    f"refused, not sent: linectl writes only within one command area of this "
                    f"PLC's stations ({nearest})"
                )
            assert server.requests["write"] == writes
            assert server.requests["write_single"] == 0
            assert sim.station("s1").commands_evaluated == evaluated
            assert driver.connected  # a refused write is ours to fix, not the connection's


async def test_a_line_runs_to_completion_over_tls(pki):
    sim, sup = await run_to_completion(tls_line(pki, count=4), within=10)
    assert (sup.finished, len(sup.quarantined)) == (4, 0)
    assert sim.servers["p"].sslctx is not None
    assert sim.servers["p"].connections_accepted == 1
