"""SSL contexts for Modbus/TCP Security, and TLS failures told in words a person can act on.

linectl builds its own contexts and connects with them: verification is never optional.
A client context checks the PLC's certificate against the configured CA *and* its name (an IP
address matches an IP subjectAltName); a server context (the simulator's) requires a client
certificate issued by its client CA. Both refuse anything older than TLS 1.2.

Plain ``ssl``: no protocol library is imported here.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from linectl.config import ModbusTls, MqttTls
from linectl.errors import ConfigError

TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def client_context(tls: ModbusTls | MqttTls, path: str = "tls") -> ssl.SSLContext:
    """The context linectl connects to a PLC or a broker with; ``path``
    (``plcs.cell_a.tls``) names the config section in errors. Raises ConfigError when a file
    cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    _load_ca(ctx, tls.ca, f"{path}.ca")
    if tls.certificate is not None and tls.private_key is not None:
        _load_identity(
            ctx, tls.certificate, tls.private_key, path, password_env=tls.private_key_password_env
        )
    # PROTOCOL_TLS_CLIENT sets both already; say so here, where a reader looks for them.
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(
    certificate: Path,
    private_key: Path,
    client_ca: Path,
    *,
    min_version: str = "TLSv1.2",
    path: str = "tls.sim",
) -> ssl.SSLContext:
    """A PLC's side (the simulator's): present ``certificate``, accept only clients whose
    certificate ``client_ca`` issued (mutual authentication)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[min_version]
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, client_ca, f"{path}.client_ca")
    _load_identity(ctx, certificate, private_key, path, password_env=None)
    return ctx


def _load_ca(ctx: ssl.SSLContext, file: Path, field: str) -> None:
    try:
        data = Path(file).read_bytes()
        if b"-----BEGIN" in data:
            ctx.load_verify_locations(cadata=data.decode("ascii"))
        else:
            ctx.load_verify_locations(cadata=data)  # DER
    except OSError as exc:
        # ssl.SSLError is an OSError whose errno is OpenSSL's, not the system's.
        why = _ssl_reason(exc) if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
        raise ConfigError([f"{field}: cannot use {file} as CA certificates: {why}"]) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError([f"{field}: {file} holds no certificate: {exc}"]) from exc


def _load_identity(
    ctx: ssl.SSLContext, cert: Path, key: Path, path: str, *, password_env: str | None
) -> None:
    asked = []

    def password() -> str:
        # Without a callable OpenSSL would prompt on the terminal: a service would hang.
        asked.append(True)
        if password_env is None:
            raise ConfigError(
                [
                    f"{path}.private_key: {key} is encrypted; name the environment variable "
                    f"holding its password in {path}.private_key_password_env"
                ]
            )
        value = os.environ.get(password_env)
        if not value:
            raise ConfigError(
                [
                    f"{path}.private_key_password_env: environment variable {password_env} is "
                    "not set or empty"
                ]
            )
        return value

    try:
        data = Path(cert).read_bytes()
        if b"-----BEGIN" in data:
            ctx.load_cert_chain(cert, key, password=password)
        else:
            # A DER certificate (as ``linectl certs`` writes it); ssl reads PEM files only.
            with tempfile.NamedTemporaryFile("w", suffix=".pem") as pem:
                pem.write(ssl.DER_cert_to_PEM_cert(data))
                pem.flush()
                ctx.load_cert_chain(pem.name, key, password=password)
    except ConfigError:
        raise
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        if exc.reason == "KEY_VALUES_MISMATCH":
            why = f"{key} is not the key of {cert}"
        elif asked:  # OpenSSL says only "PEM lib" for a wrong password
            why = f"cannot decrypt {key} with the password in {password_env} (wrong password?)"
        else:
            why = f"{cert} and {key} must be a certificate and its PEM key ({reason})"
        raise ConfigError([f"{path}.certificate: {why}"]) from exc
    except OSError as exc:
        raise ConfigError(
            [f"{path}: cannot read {exc.filename or cert}: {exc.strerror or exc}"]
        ) from exc


# --- failures --------------------------------------------------------------------------------

# Templates: {peer} is who refused (the PLC, the broker).
_REFUSED_BY_PEER = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "{peer} requires a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "{peer} does not trust the CA that issued our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "{peer} refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "{peer} refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "{peer} says our certificate has expired",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "{peer} refused the handshake (no client certificate, "
    "or no cipher in common)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common with {peer}",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common with {peer}",
    "TLSV1_ALERT_ACCESS_DENIED": "{peer} denied access to our certificate",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the file and line of its C source."""
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    text = text.split(" (_ssl.c:")[0]
    return text.split("] ", 1)[-1]


def describe_tls_error(
    exc: BaseException, *, peer: str = "the PLC", plaintext: str = "a plaintext Modbus TCP port"
) -> str:
    """Why a TLS connection to ``peer`` failed, for a log line and a ConnectionChange reason;
    ``plaintext`` is what a peer that does not speak TLS there probably is."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"certificate verify failed: {exc.verify_message}"
        # 2, 20, 21: no issuer found; 18, 19: a self-signed certificate (a PLC sending its own
        # CA along) that tls.ca does not hold.
        if exc.verify_code in (2, 18, 19, 20, 21):
            return f"{why} ({peer}'s certificate is not issued by a CA in tls.ca)"
        if exc.verify_code == 62:  # hostname or IP address mismatch
            return f"{why} (set tls.server_hostname to a name in {peer}'s certificate)"
        return why
    closed = (
        f"{peer} closed the connection during the TLS handshake ({plaintext}, or it refused us)"
    )
    if isinstance(exc, ssl.SSLError):
        reason = _ssl_reason(exc)
        if exc.reason in _REFUSED_BY_PEER:
            refusal = _REFUSED_BY_PEER[exc.reason].format(peer=peer)
            return f"{refusal} ({reason})"
        if exc.reason in _NOT_TLS:
            return f"{peer} does not answer in TLS: {plaintext}? ({reason})"
        if isinstance(exc, ssl.SSLEOFError):
            return closed
        return f"TLS error: {reason}"
    if isinstance(exc, ConnectionError):
        return closed
    return str(exc) or type(exc).__name__
