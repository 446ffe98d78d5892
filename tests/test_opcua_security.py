"""OPC UA security on real sockets: a secure-only simulated PLC refuses every attempt that is
not signed, trusted and logged in, and the driver refuses every PLC it has no reason to trust.

Each refusal must be clear: it names the PLC, its URL and the reason. Servers are shared by the
tests of this module (an OPC UA server takes over a second to start).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.crypto import security_policies

from linectl.config import Line, parse_config
from linectl.contract import Command, State
from linectl.drivers.base import ConnectionChange, DriverEvent
from linectl.drivers.opcua import OpcUaDriver
from linectl.security import generate_certificate, write_certificate
from simulators.opcua_server import OpcUaSimServer, ServerSecurity
from simulators.station import SimPlc
from tests.test_opcua_driver import Recorder, update

pytestmark = pytest.mark.asyncio(loop_scope="module")

PLC_URI = "urn:linectl:test:plc"
OUR_URI = "urn:linectl:test:controller"
USER, PASSWORD = "operator", "s3cret-Pa55word-for-tests"
_seq = itertools.count(1)  # the shared PLC evaluates only newer sequence numbers

LINE = """
line: secure
plcs:
  cell_s:
    protocol: opcua
    url: "opc.tcp://127.0.0.1:4840"
    publishing_interval_s: 0
    heartbeat_timeout_s: 1
    timeout_s: 2
    connect_timeout_s: 3
    backoff_initial_s: 0.05
    backoff_max_s: 0.2
stations:
  s1: {plc: cell_s, address: s1, cycle_s: 1}
flow: [s1]
time_scale: 0.02
"""


@dataclass(frozen=True)
class Pki:
    dir: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.der"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key.pem"

    @property
    def client_trust(self) -> Path:  # what the controller trusts
        return self.dir / "client_trust"

    @property
    def server_trust(self) -> Path:  # what the PLC trusts
        return self.dir / "server_trust"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Every certificate the tests need, made with linectl.security."""
    out = tmp_path_factory.mktemp("pki")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    made = {
        "plc": (PLC_URI, {}),
        "plc_expired": (PLC_URI, {"not_before": past, "not_after": past + dt.timedelta(days=1)}),
        "plc_wrong_uri": ("urn:linectl:test:someone-else", {}),
        "plc_untrusted": (PLC_URI, {}),
        "ctl": (OUR_URI, {}),
        "ctl_expired": (OUR_URI, {"not_before": past, "not_after": past + dt.timedelta(days=1)}),
        "ctl_wrong_uri": ("urn:linectl:test:someone-else", {}),
        "ctl_untrusted": (OUR_URI, {}),
    }
    pki = Pki(out)
    pki.client_trust.mkdir()
    pki.server_trust.mkdir()
    for name, (uri, validity) in made.items():
        cert, key = generate_certificate(name, uri, ips=["127.0.0.1"], **validity)
        files = write_certificate(out, name, cert, key)
        if not name.endswith("untrusted"):
            trust = pki.client_trust if name.startswith("plc") else pki.server_trust
            (trust / files.certificate.name).write_bytes(files.certificate.read_bytes())
    return pki


def line_config(security: str = "") -> Line:
    """The test line; ``security`` is the YAML of plcs.cell_s.security (flow style)."""
    text = LINE
    if security:
        text = text.replace(
            "    backoff_max_s: 0.2\n", f"    backoff_max_s: 0.2\n    security: {security}\n"
        )
    return parse_config(text)


def security_yaml(
    pki: Pki,
    *,
    policy: str = "Basic256Sha256",
    mode: str = "SignAndEncrypt",
    cert: str = "ctl",
    user: str | None = USER,
    password_env: str = "LINECTL_TEST_PLC_PASSWORD",
) -> str:
    fields = [
        f"policy: {policy}",
        f"mode: {mode}",
        f"certificate: '{pki.cert(cert)}'",
        f"private_key: '{pki.key(cert)}'",
        f"trust: '{pki.client_trust}'",
        f"application_uri: '{OUR_URI}'",
    ]
    if user:
        fields += [f"user: {user}", f"password_env: {password_env}"]
    return "{" + ", ".join(fields) + "}"


@asynccontextmanager
async def secure_plc(pki: Pki, cert: str = "plc") -> AsyncIterator[OpcUaSimServer]:
    line = line_config()
    plc = SimPlc("cell_s", dict(line.stations), line.time_scale, 0.1)
    security = ServerSecurity(
        certificate=pki.cert(cert),
        private_key=pki.key(cert),
        trust=pki.server_trust,
        application_uri=PLC_URI,
        users={USER: PASSWORD},
    )
    server = OpcUaSimServer("cell_s", line.plcs["cell_s"], plc, port=0, security=security)
    await server.start()
    heartbeat = asyncio.create_task(plc.run_heartbeat())
    try:
        yield server
    finally:
        heartbeat.cancel()
        await asyncio.wait([heartbeat])
        plc.stop()
        await server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc(pki: Pki) -> AsyncIterator[OpcUaSimServer]:
    """The secure-only PLC most tests talk to."""
    async with secure_plc(pki) as server:
        yield server


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LINECTL_TEST_PLC_PASSWORD", PASSWORD)
    return PASSWORD


@asynccontextmanager
async def running(line: Line, url: str) -> AsyncIterator[tuple[OpcUaDriver, Recorder]]:
    config = line.plcs["cell_s"].model_copy(update={"url": url})
    recorder = Recorder()
    driver = OpcUaDriver("cell_s", config, dict(line.stations), recorder)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(driver.run())
        try:
            yield driver, recorder
        finally:
            task.cancel()


def is_lost(e: DriverEvent) -> bool:
    return isinstance(e, ConnectionChange) and not e.connected


async def refusal(line: Line, url: str) -> str:
    """The reason the driver gives for its first failed connect."""
    async with running(line, url) as (driver, rec):
        lost = await rec.wait_for(is_lost, within=8)
        assert not driver.connected
        assert driver.statistics().last_error == lost.reason  # type: ignore[union-attr]
        return lost.reason  # type: ignore[union-attr]


async def raw_connect(
    url: str,
    pki: Pki,
    *,
    cert: str = "ctl",
    policy: type[security_policies.SecurityPolicy] = security_policies.SecurityPolicyBasic256Sha256,
    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
    uri: str = OUR_URI,
    user: str | None = USER,
    password: str | None = PASSWORD,
    secure: bool = True,
    deadline: float = 4,
) -> None:
    """Connect with plain asyncua, as a client outside linectl would; raise what it meets."""
    client = Client(url, timeout=deadline)
    client.application_uri = uri
    if secure:
        await client.set_security(
            policy,
            certificate=str(pki.cert(cert)),
            private_key=str(pki.key(cert)),
            server_certificate=str(pki.cert("plc")),
            mode=mode,
        )
    if user:
        client.set_user(user)
    if password:
        client.set_password(password)
    async with asyncio.timeout(deadline + 1):
        await client.connect()
    await client.disconnect()


def status_of(info: pytest.ExceptionInfo[BaseException]) -> str:
    assert isinstance(info.value, ua.UaStatusCodeError), repr(info.value)
    return ua.StatusCode(info.value.code).name


# --- the PLC refuses ---------------------------------------------------------------------------


async def test_a_good_client_gets_in(plc: OpcUaSimServer, pki: Pki) -> None:
    """The baseline every refusal below differs from in one thing only."""
    await raw_connect(plc.url, pki)


async def test_none_mode_is_refused_even_with_the_right_password(
    plc: OpcUaSimServer, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncua lets a None channel create a session on a server without a None endpoint; the
    simulator refuses the login because no trusted certificate secures the channel."""
    url = plc.url
    endpoints = await Client(url).connect_and_get_server_endpoints()
    assert endpoints and all(ep.SecurityMode != ua.MessageSecurityMode.None_ for ep in endpoints)
    # Skip asyncua's client-side check, as a hand-made client would.
    token = ua.UserTokenPolicy(
        PolicyId="username",
        TokenType=ua.UserTokenType.UserName,
        SecurityPolicyUri=security_policies.SecurityPolicyNone.URI,
    )
    monkeypatch.setattr(
        Client,
        "find_endpoint",
        staticmethod(lambda eps, mode, uri: ua.EndpointDescription(UserIdentityTokens=[token])),
    )
    with pytest.raises(ua.UaStatusCodeError) as info:
        await raw_connect(url, pki, secure=False)
    assert status_of(info) == "BadUserAccessDenied"


async def test_the_driver_names_a_missing_none_endpoint(plc: OpcUaSimServer) -> None:
    reason = await refusal(line_config(), plc.url)
    assert f"plc 'cell_s' ({plc.url})" in reason
    assert "offers no unsecured (None) endpoint" in reason


@pytest.mark.parametrize(
    ("user", "password", "status"),
    [
        (None, None, "BadIdentityTokenRejected"),  # anonymous
        (USER, "wrong", "BadUserAccessDenied"),
        ("admin", "anything", "BadUserAccessDenied"),  # asyncua's default makes this an admin
        ("nobody", PASSWORD, "BadUserAccessDenied"),
    ],
    ids=["anonymous", "wrong-password", "remote-admin", "unknown-user"],
)
async def test_logins_are_refused(
    plc: OpcUaSimServer, pki: Pki, user: str | None, password: str | None, status: str
) -> None:
    with pytest.raises(ua.UaStatusCodeError) as info:
        await raw_connect(plc.url, pki, user=user, password=password)
    assert status_of(info) == status


@pytest.mark.parametrize(
    ("cert", "uri", "status"),
    [
        ("ctl_untrusted", OUR_URI, "BadCertificateUntrusted"),
        ("ctl_expired", OUR_URI, "BadCertificateTimeInvalid"),
        ("ctl_wrong_uri", OUR_URI, "BadCertificateUriInvalid"),
    ],
    ids=["untrusted", "expired", "wrong-uri"],
)
async def test_client_certificates_are_refused(
    plc: OpcUaSimServer, pki: Pki, cert: str, uri: str, status: str
) -> None:
    with pytest.raises(ua.UaStatusCodeError) as info:
        await raw_connect(plc.url, pki, cert=cert, uri=uri)
    assert status_of(info) == status


@pytest.mark.parametrize(
    "policy",
    [security_policies.SecurityPolicyBasic256, security_policies.SecurityPolicyBasic128Rsa15],
    ids=["Basic256", "Basic128Rsa15"],
)
async def test_deprecated_policies_are_refused_at_once(
    plc: OpcUaSimServer, pki: Pki, policy: type[security_policies.SecurityPolicy]
) -> None:
    """Answered with an error, not left waiting for an answer as asyncua would."""
    with pytest.raises(ua.UaStatusCodeError) as info:
        await raw_connect(plc.url, pki, policy=policy, deadline=1)
    assert status_of(info) == "BadSecurityPolicyRejected"


async def test_the_driver_says_the_plc_refused_its_certificate(
    plc: OpcUaSimServer, pki: Pki, password: str
) -> None:
    reason = await refusal(line_config(security_yaml(pki, cert="ctl_untrusted")), plc.url)
    assert reason == (
        f"plc 'cell_s' ({plc.url}): secure connect: the PLC does not trust our certificate "
        "(BadCertificateUntrusted)"
    )


async def test_the_driver_reports_a_wrong_password_without_showing_it(
    plc: OpcUaSimServer, pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LINECTL_TEST_PLC_PASSWORD", "wrong-Secret-42")
    caplog.set_level(logging.DEBUG)
    reason = await refusal(line_config(security_yaml(pki)), plc.url)
    assert "the PLC refused the login of user 'operator' (BadUserAccessDenied)" in reason
    assert "wrong-Secret-42" not in caplog.text and "wrong-Secret-42" not in reason


# --- the driver refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "why"),
    [
        ("plc_untrusted", r"is not in the trust list and no CA in it issued it"),
        ("plc_expired", r"expired on \d{4}-\d\d-\d\d"),
        (
            "plc_wrong_uri",
            "carries application URI urn:linectl:test:someone-else, "
            f"but the server calls itself '{PLC_URI}'",
        ),
    ],
    ids=["untrusted", "expired", "wrong-uri"],
)
async def test_server_certificates_are_refused(
    pki: Pki, password: str, cert: str, why: str
) -> None:
    async with secure_plc(pki, cert) as server:
        reason = await refusal(line_config(security_yaml(pki)), server.url)
    assert reason.startswith(f"plc 'cell_s' ({server.url}): secure connect: refused the PLC's")
    assert re.search(why, reason), reason


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "mode"),
    [
        ("Basic256Sha256", "SignAndEncrypt"),
        ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
        ("Aes256_Sha256_RsaPss", "SignAndEncrypt"),
        ("Aes256_Sha256_RsaPss", "Sign"),
    ],
)
async def test_secure_round_trip(
    plc: OpcUaSimServer,
    pki: Pki,
    password: str,
    policy: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    line = line_config(security_yaml(pki, policy=policy, mode=mode))
    async with running(line, plc.url) as (driver, rec):
        await driver.wait_connected()
        status = await driver.command("s1", 0, next(_seq), Command.START, 7)
        assert status.cmd_status.name == "ACCEPTED"
        await rec.wait_for(update("s1", 0, State.COMPLETE, unit=7))
        await driver.command("s1", 0, next(_seq), Command.RESET, 0)
        await rec.wait_for(update("s1", 0, State.IDLE))
    assert PASSWORD not in caplog.text
    assert "ActivateSessionRequest(<identity token hidden by linectl>)" in caplog.text
