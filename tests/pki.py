"""Certificates for TLS tests (Modbus/TCP Security, MQTT to a broker): CAs from
linectl.security and a small issuer for the leaf certificates a CA signs, written once per
module that asks for the ``pki`` fixture."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from linectl.security import generate_certificate, write_certificate


def _write_pem(out: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_file, key_file = out / f"{name}.pem", out / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def _issue(ca: x509.Certificate, ca_key, name: str, *, server: bool):
    """A leaf certificate ``ca`` signs: a PLC's (serverAuth, IP SAN 127.0.0.1) or a client's."""
    key = ec.generate_private_key(ec.SECP256R1())  # fast; the CAs are RSA
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([use]), critical=False)
    )
    if server:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem issued plc (the simulator) and linectl (our client); other.pem issued rogue.
    plc-self and linectl-self are self-signed, DER, as ``linectl certs`` makes them."""
    out = tmp_path_factory.mktemp("pki")
    for name in ("plc-self", "linectl-self"):
        cert, key = generate_certificate(name, f"urn:linectl:test:{name}", ips=["127.0.0.1"])
        write_certificate(out, name, cert, key)
    for ca_name, leaves in (
        ("ca", [("plc", True), ("linectl", False)]),
        ("other", [("rogue", False)]),
    ):
        ca, ca_key = generate_certificate(ca_name, f"urn:linectl:test:{ca_name}")
        _write_pem(out, ca_name, ca, ca_key)
        for leaf, server in leaves:
            _write_pem(out, leaf, *_issue(ca, ca_key, leaf, server=server))
    return out
