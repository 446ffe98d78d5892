"""Certificates, trust lists, secrets and the security section of a config, without sockets:
``linectl certs`` makes what OPC UA asks for, a trust list trusts only what it holds, and a
password never is in a config file."""

from __future__ import annotations

import datetime as dt
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import parse_config
from linectl.errors import ConfigError
from linectl.security import (
    CertificateRejected,
    TrustList,
    generate_certificate,
    load_certificate,
    load_private_key,
    read_secret,
    write_certificate,
)

URI = "urn:example.com:linectl:test"
PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def made() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    return generate_certificate("cell_a", URI, dns=["plc-a.example.com"], ips=["127.0.0.1"])


# --- linectl certs -----------------------------------------------------------------------------


def test_certs_makes_what_opc_ua_asks_of_an_application_certificate(tmp_path: Path) -> None:
    args = ["certs", "ctl", "--uri", URI, "--dns", "ctl.example.com", "--ip", "10.0.0.5"]
    result = CliRunner().invoke(app, [*args, "--days", "30", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "SHA-256 " in result.stdout
    cert = load_certificate(tmp_path / "ctl.der")
    key = load_private_key(tmp_path / "ctl.key.pem")
    assert key.key_size >= 2048
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ctl"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [URI]
    assert san.get_values_for_type(x509.DNSName) == ["ctl.example.com"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment and usage.key_encipherment
    assert usage.data_encipherment and usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    cert.verify_directly_issued_by(cert)  # self-signed
    assert stat.S_IMODE((tmp_path / "ctl.key.pem").stat().st_mode) == 0o600


def test_certs_never_overwrites_a_key_unless_told(tmp_path: Path) -> None:
    args = ["certs", "ctl", "--uri", URI, "--out", str(tmp_path)]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = (tmp_path / "ctl.key.pem").read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1
    assert "ctl.der exists" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "ctl.key.pem").read_bytes() == first
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
    assert (tmp_path / "ctl.key.pem").read_bytes() != first


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ip", "10.0.0.256"], "'10.0.0.256' is not an IP address"),
        (["--key-size", "1024"], "--key-size"),
    ],
)
def test_certs_refuses_bad_options(tmp_path: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["certs", "x", "--uri", URI, "--out", str(tmp_path), *extra])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


# --- trust lists -------------------------------------------------------------------------------


def _files(tmp_path: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Path:
    return write_certificate(tmp_path, name, cert, key).certificate


def test_a_pinned_certificate_is_trusted_and_nothing_else(tmp_path: Path, made) -> None:
    cert, _key = made
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "cell_a.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    trust = TrustList.load(trust_dir)
    trust.check(cert, application_uri=URI, peer="server")
    stranger, _ = generate_certificate("cell_a", URI)  # same name and URI, other key
    with pytest.raises(CertificateRejected, match="is not in the trust list") as info:
        trust.check(stranger, application_uri=URI, peer="server")
    assert info.value.status == "BadCertificateUntrusted"
    assert TrustList(()).issuer_of(cert) is None  # an empty list trusts nobody


def test_expired_and_wrong_uri_certificates_are_refused_with_their_reason(made) -> None:
    old, _ = generate_certificate("old", URI, not_before=PAST, not_after=PAST + dt.timedelta(1))
    trust = TrustList((old, made[0]))
    with pytest.raises(CertificateRejected, match=r"expired on 2020-01-02 00:00 UTC") as info:
        trust.check(old, application_uri=URI, peer="server")
    assert info.value.status == "BadCertificateTimeInvalid"
    with pytest.raises(CertificateRejected, match="but the client calls itself 'urn:other'"):
        trust.check(made[0], application_uri="urn:other", peer="client")


def test_a_certificate_issued_by_a_trusted_ca_is_trusted(tmp_path: Path) -> None:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Plant CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(1))
        .not_valid_after(now + dt.timedelta(30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf, _ = generate_certificate("plc", URI)
    issued = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(ca_name)
        .public_key(leaf.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(1))
        .not_valid_after(now + dt.timedelta(30))
    )
    for ext in leaf.extensions:
        if not isinstance(ext.value, x509.BasicConstraints | x509.AuthorityKeyIdentifier):
            issued = issued.add_extension(ext.value, ext.critical)
    issued_cert = issued.sign(ca_key, hashes.SHA256())
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    trust = TrustList.load([tmp_path / "ca.pem"])
    trust.check(issued_cert, application_uri=URI, peer="server")
    with pytest.raises(CertificateRejected, match="not in the trust list"):
        trust.check(leaf, application_uri=URI, peer="server")  # self-signed, not by the CA


def test_a_trust_directory_with_a_private_key_in_it_is_an_error(tmp_path: Path, made) -> None:
    _files(tmp_path, "cell_a", *made)
    with pytest.raises(ValueError, match=r"cell_a\.key\.pem: not a certificate"):
        TrustList.load(tmp_path)


# --- secrets -----------------------------------------------------------------------------------


def test_secrets_come_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLC_PW", "hunter2")
    assert read_secret("PLC_PW", None) == "hunter2"
    (tmp_path / "pw").write_text("from-file\n")
    assert read_secret(None, tmp_path / "pw") == "from-file"
    monkeypatch.delenv("PLC_PW")
    with pytest.raises(ValueError, match="environment variable PLC_PW is not set"):
        read_secret("PLC_PW", None)
    with pytest.raises(ValueError, match="cannot read password_file"):
        read_secret(None, tmp_path / "missing")


# --- the security section of a config ----------------------------------------------------------

LINE = """\
line: secure
plcs:
  cell_a:
    protocol: opcua
    url: "opc.tcp://127.0.0.1:4840"
{security}
stations:
  a1: {{plc: cell_a, address: a1, cycle_s: 1}}
flow: [a1]
"""
SECURITY = """\
    security:
      policy: Aes256_Sha256_RsaPss
      certificate: pki/ctl.der
      private_key: /etc/linectl/ctl.key.pem
      trust: [pki/plcs/cell_a.der]
      application_uri: urn:example.com:linectl
      user: operator
"""


def test_a_password_in_the_config_is_refused_with_the_fix(tmp_path: Path) -> None:
    text = LINE.format(security=SECURITY + "      password: hunter2\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "line.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("line.yaml:6: plcs.cell_a.security: a password must not be written")
    assert "password_env" in problem and "password_file" in problem
    assert "hunter2" not in problem


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("", "user 'operator' needs password_env or password_file"),
        (
            "      password_env: PW\n      password_file: pw.txt\n",
            "give password_env or password_file, not both",
        ),
        ("      password_env: PW\n      policy: Basic256\n", "policy: Input should be"),
        ("      password_env: PW\n      mode: None\n", "mode: Input should be 'Sign'"),
    ],
)
def test_security_mistakes_are_reported(extra: str, message: str) -> None:
    security = SECURITY
    if "policy:" in extra:  # replace the policy rather than give the key twice
        security = security.replace("      policy: Aes256_Sha256_RsaPss\n", "")
    with pytest.raises(ConfigError, match=message):
        parse_config(LINE.format(security=security + extra), "line.yaml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "line.yaml"
    text = LINE.format(security=SECURITY + "      password_file: secrets/pw\n")
    sec = parse_config(text, str(path)).plcs["cell_a"].security
    assert sec is not None
    assert sec.certificate == tmp_path / "conf" / "pki" / "ctl.der"
    assert sec.private_key == Path("/etc/linectl/ctl.key.pem")
    assert sec.trust == [tmp_path / "conf" / "pki" / "plcs" / "cell_a.der"]
    assert sec.password_file == tmp_path / "conf" / "secrets" / "pw"
    assert (sec.policy, sec.mode) == ("Aes256_Sha256_RsaPss", "SignAndEncrypt")


def test_check_warns_about_a_plc_without_security(tmp_path: Path) -> None:
    path = tmp_path / "line.yaml"
    path.write_text(LINE.format(security=""))
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 0
    assert "ok: line 'secure'" in result.stdout
    assert (
        f"{path}: warning: plcs.cell_a (opc.tcp://127.0.0.1:4840) has no security section"
        in result.stderr
    )
    path.write_text(LINE.format(security=SECURITY + "      password_env: PW\n"))
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_the_example_in_docs_security_md_is_a_valid_config() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "security.md"
    (example,) = re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)
    text = "line: doc\n" + example + "stations:\n  a1: {plc: cell_a, address: a1, cycle_s: 1}\n"
    sec = parse_config(text + "flow: [a1]\n", str(doc)).plcs["cell_a"].security
    assert sec is not None and sec.user == "linectl" and sec.password_env
    assert sec.trust == doc.parent / "pki" / "trusted"
