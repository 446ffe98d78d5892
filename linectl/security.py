"""Application instance certificates, trust lists and secrets, for OPC UA (and Modbus/TCP Security).

Pure ``cryptography`` code: no protocol library is imported here, so the OPC UA driver, the
simulator and ``linectl certs`` share one idea of what a valid, trusted certificate is, and each
refusal carries a reason a person can act on ("expired on 2024-01-31", "not in the trust list").

Trust is explicit: a peer certificate is trusted when its exact DER bytes are in the trust list
(a pinned self-signed certificate) or when a CA certificate in the trust list issued it directly.
Nothing is ever trusted on first use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from linectl.errors import PlcConnectionLost

CERT_SUFFIXES = {".der", ".pem", ".crt", ".cer"}


class PlcSecurityError(PlcConnectionLost):
    """A secure connection to a PLC was refused: by us (its certificate) or by it (ours, login)."""


class CertificateRejected(Exception):
    """A peer certificate failed a check: ``reason`` says which, ``status`` is the OPC UA code."""

    def __init__(self, reason: str, status: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# --- generating --------------------------------------------------------------------------------


def generate_certificate(
    name: str,
    application_uri: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 365,
    key_size: int = 2048,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed OPC UA application instance certificate and its RSA key.

    The key usages and extended key usages are the ones OPC UA Part 6 asks of an application
    instance certificate usable as client and as server; the application URI is the URI
    subjectAltName every OPC UA stack compares with the peer's ApplicationUri.
    ``not_before``/``not_after`` override the validity (tests make expired certificates).
    """
    if key_size < 2048:
        raise ValueError("OPC UA security policies need an RSA key of at least 2048 bits")
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=days)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "linectl"),
        ]
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # Self-signed: the certificate is its own issuer, so it may sign itself (as asyncua's and
        # the OPC Foundation's generators do).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class CertificateFiles:
    certificate: Path
    private_key: Path


def write_certificate(
    out: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey, *, overwrite: bool = False
) -> CertificateFiles:
    """Write ``<out>/<name>.der`` (the certificate, as OPC UA trust lists want it) and
    ``<out>/<name>.key.pem`` (the unencrypted PKCS#8 key, readable by its owner only)."""
    out.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(out / f"{name}.der", out / f"{name}.key.pem")
    if not overwrite:
        for path in (files.certificate, files.private_key):
            if path.exists():
                raise FileExistsError(
                    f"{path} exists; choose another name, or overwrite it (linectl certs --force)"
                )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create the key file with mode 0600 from the start, not chmod it after writing.
    fd = os.open(files.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    files.certificate.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return files


# --- reading -----------------------------------------------------------------------------------


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in one file, PEM (one or more) or DER, whatever its suffix."""
    data = Path(path).read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]


def load_certificate(path: Path) -> x509.Certificate:
    return load_certificates(path)[0]


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    data = Path(path).read_bytes()
    if b"-----BEGIN" in data:
        key = serialization.load_pem_private_key(data, password=None)
    else:
        key = serialization.load_der_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path}: OPC UA needs an RSA private key")
    return key


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 thumbprint, as PLC engineering tools show it (upper-case hex pairs)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(cert: x509.Certificate) -> str:
    """A certificate as a person finds it in a trust list: its subject and SHA-256 thumbprint."""
    return f"'{cert.subject.rfc4514_string()}' (SHA-256 {fingerprint(cert)[:23]}...)"


def uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def first_der(blob: bytes) -> bytes:
    """The leading certificate of a DER chain (OPC UA sends certificate and chain concatenated)."""
    if len(blob) < 4 or blob[0] != 0x30:
        return blob
    first = blob[1]
    if first < 0x80:
        return blob[: 2 + first]
    width = first & 0x7F
    length = int.from_bytes(blob[2 : 2 + width], "big")
    return blob[: 2 + width + length]


# --- trusting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustList:
    """Certificates we trust: pinned peer certificates and the CAs that issue them."""

    certificates: tuple[x509.Certificate, ...]
    sources: tuple[Path, ...] = ()

    @classmethod
    def load(cls, locations: Path | Iterable[Path]) -> TrustList:
        """Read a directory (every .der/.pem/.crt/.cer in it) or a list of files and directories.

        Raises OSError or ValueError naming the file that cannot be read.
        """
        if isinstance(locations, str | Path):
            locations = [Path(locations)]
        certs: list[x509.Certificate] = []
        sources: list[Path] = []
        for location in locations:
            location = Path(location)
            files = (
                sorted(p for p in location.iterdir() if p.suffix.lower() in CERT_SUFFIXES)
                if location.is_dir()
                else [location]
            )
            for file in files:
                try:
                    certs.extend(load_certificates(file))
                except ValueError as exc:
                    raise ValueError(f"{file}: not a certificate ({exc})") from None
                sources.append(file)
        return cls(tuple(certs), tuple(sources))

    def issuer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        """The trusted certificate that vouches for ``cert``: itself (pinned) or its issuing CA."""
        der = cert.public_bytes(serialization.Encoding.DER)
        for trusted in self.certificates:
            if trusted.public_bytes(serialization.Encoding.DER) == der:
                return trusted
        for ca in self.certificates:
            if ca.subject != cert.issuer or not _is_ca(ca):
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        return None

    def check(
        self,
        cert: x509.Certificate,
        *,
        application_uri: str | None,
        peer: str,
        now: dt.datetime | None = None,
    ) -> None:
        """Raise CertificateRejected unless ``cert`` is trusted, valid now, carries the peer's
        application URI and allows the uses OPC UA needs. ``peer`` is "server" or "client"."""
        now = now or dt.datetime.now(dt.UTC)
        issuer = self.issuer_of(cert)
        if issuer is None:
            raise CertificateRejected(
                f"certificate {describe(cert)} is not in the trust list and no CA in it issued it",
                "BadCertificateUntrusted",
            )
        for c, what in ((cert, "certificate"), (issuer, "issuing CA certificate")):
            if c.not_valid_after_utc < now:
                raise CertificateRejected(
                    f"{what} {describe(c)} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                    "BadCertificateTimeInvalid",
                )
            if c.not_valid_before_utc > now:
                raise CertificateRejected(
                    f"{what} {describe(c)} is not valid before "
                    f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                    "BadCertificateTimeInvalid",
                )
        if application_uri is not None and application_uri not in uris(cert):
            raise CertificateRejected(
                f"certificate {describe(cert)} carries application URI "
                f"{', '.join(uris(cert)) or '(none)'}, but the {peer} calls itself "
                f"'{application_uri}'",
                "BadCertificateUriInvalid",
            )
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            needed = (usage.digital_signature, usage.key_encipherment, usage.data_encipherment)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise CertificateRejected(
                f"certificate {describe(cert)} lacks the keyUsage or extendedKeyUsage extension",
                "BadCertificateInvalid",
            ) from None
        if not all(needed):
            raise CertificateRejected(
                f"certificate {describe(cert)} does not allow digitalSignature, "
                "keyEncipherment and dataEncipherment",
                "BadCertificateUseNotAllowed",
            )
        want, use = (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")
            if peer == "server"
            else (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")
        )
        if want not in eku:
            raise CertificateRejected(
                f"certificate {describe(cert)} is not allowed for {use} (extendedKeyUsage)",
                "BadCertificateUseNotAllowed",
            )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_own_certificate(cert: x509.Certificate, application_uri: str, path: Path) -> None:
    """Our own certificate must name our application URI and be valid, or every peer refuses it."""
    now = dt.datetime.now(dt.UTC)
    if application_uri not in uris(cert):
        raise ValueError(
            f"certificate {path} carries application URI {', '.join(uris(cert)) or '(none)'}, "
            f"not application_uri '{application_uri}'"
        )
    if cert.not_valid_after_utc < now:
        raise ValueError(
            f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "make a new one with 'linectl certs'"
        )


# --- secrets -----------------------------------------------------------------------------------


def read_secret(password_env: str | None, password_file: Path | None) -> str:
    """The password from an environment variable or a file (its first line).

    Errors name where the secret was looked for, never the secret.
    """
    if password_env is not None:
        value = os.environ.get(password_env)
        if not value:
            raise ValueError(f"environment variable {password_env} is not set or empty")
        return value
    if password_file is not None:
        try:
            text = Path(password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read password_file {password_file}: {exc.strerror}") from None
        value = text.splitlines()[0] if text else ""
        if not value:
            raise ValueError(f"password_file {password_file} is empty")
        return value
    raise ValueError("no password_env or password_file")


def secret_digest(secret: str) -> bytes:
    """What a server keeps of a password: a hash to compare in constant time."""
    return hashlib.sha256(secret.encode("utf-8")).digest()
