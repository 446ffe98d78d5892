"""OPC UA security for the driver: the policy, mode, certificates and login a PLC connection
uses, with the PLC's certificate checked against our trust list before a secure channel is
opened with it (asyncua alone would trust the first certificate it sees), and the password kept
out of asyncua's DEBUG log."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from asyncua import Client, ua
from asyncua.crypto import security_policies
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from linectl.config import OpcUaSecurity
from linectl.security import (
    CertificateRejected,
    PlcSecurityError,
    TrustList,
    check_own_certificate,
    first_der,
    load_certificate,
    load_private_key,
    read_secret,
)


class _HideIdentityToken(logging.Filter):
    """asyncua logs every request it sends at DEBUG level, the password in ActivateSession
    included (in clear when the channel is encrypted): log that one request by its name only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, ua.ActivateSessionRequest) for arg in record.args
        ):
            record.args = tuple(
                "ActivateSessionRequest(<identity token hidden by linectl>)"
                if isinstance(arg, ua.ActivateSessionRequest)
                else arg
                for arg in record.args
            )
        return True


logging.getLogger("asyncua.client.ua_client.UASocketProtocol").addFilter(_HideIdentityToken())


_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_POLICY_NAMES = {cls.URI: name for name, cls in _POLICIES.items()}


async def secure_client(
    client: Client, sec: OpcUaSecurity, refuse: Callable[[str], PlcSecurityError]
) -> None:
    """Set the configured policy, mode, certificate and login on ``client``, after checking
    the PLC's certificate against the trust list.

    asyncua on its own trusts whatever server certificate the endpoint list offers (it
    fetches the list over an unsecured channel and pins the first certificate it sees), and
    ``certificate_validator`` only runs later, in CreateSession. So the certificate is
    checked here, before a secure channel is opened with it, and again in CreateSession.
    Files are read at every connect, so rotated certificates take effect on reconnect.
    """
    policy = _POLICIES[sec.policy]
    mode = getattr(ua.MessageSecurityMode, sec.mode)
    try:
        own = load_certificate(sec.certificate)
        check_own_certificate(own, sec.application_uri, sec.certificate)
        key = load_private_key(sec.private_key)
        trust = TrustList.load(sec.trust)
        password = read_secret(sec.password_env, sec.password_file) if sec.user else None
    except OSError as exc:
        raise refuse(f"cannot read {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise refuse(str(exc)) from None
    client.application_uri = sec.application_uri
    endpoints = await client.connect_and_get_server_endpoints()
    endpoint = next(
        (
            ep
            for ep in endpoints
            if ep.SecurityPolicyUri == policy.URI
            and ep.SecurityMode == mode
            and ep.EndpointUrl.startswith("opc.tcp:")
        ),
        None,
    )
    if endpoint is None:
        offered = sorted(
            f"{_POLICY_NAMES.get(ep.SecurityPolicyUri, ep.SecurityPolicyUri.rsplit('#')[-1])}"
            f"/{ep.SecurityMode.name}"
            for ep in endpoints
        )
        raise refuse(
            f"the PLC offers no {sec.policy}/{sec.mode} endpoint "
            f"(it offers {', '.join(offered) or 'none'})"
        )
    if not endpoint.ServerCertificate:
        raise refuse("the PLC's endpoint carries no certificate")
    server_der = first_der(endpoint.ServerCertificate)
    server_uri = endpoint.Server.ApplicationUri
    try:
        trust.check(
            x509.load_der_x509_certificate(server_der),
            application_uri=server_uri,
            peer="server",
        )
    except (ValueError, CertificateRejected) as exc:
        raise refuse(f"refused the PLC's certificate: {exc}") from None
    check_login(endpoint, sec.user, mode, refuse)
    await client.set_security(
        policy,
        certificate=own.public_bytes(serialization.Encoding.DER),
        private_key=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        server_certificate=server_der,
        mode=mode,
    )

    async def validate(cert: x509.Certificate, server: ua.ApplicationDescription) -> None:
        # CreateSession's answer came over the secure channel: check the URI it names, too.
        try:
            trust.check(cert, application_uri=server.ApplicationUri, peer="server")
        except CertificateRejected as exc:
            raise refuse(f"refused the PLC's certificate: {exc}") from None

    client.certificate_validator = validate
    if sec.user is not None and password is not None:
        client.set_user(sec.user)
        client.set_password(password)


def check_login(
    endpoint: ua.EndpointDescription,
    user: str | None,
    mode: Any,
    refuse: Callable[[str], PlcSecurityError],
) -> None:
    kind = ua.UserTokenType.UserName if user else ua.UserTokenType.Anonymous
    tokens = [t for t in endpoint.UserIdentityTokens if t.TokenType == kind]
    if not tokens:
        what = f"user name login (user '{user}')" if user else "anonymous login; set user"
        raise refuse(f"the PLC's endpoint does not allow {what}")
    # An explicit None token policy on a Sign-only channel would have asyncua send the
    # password readable on the wire (it only logs a warning).
    if user and mode == ua.MessageSecurityMode.Sign:
        uri = tokens[0].SecurityPolicyUri
        if uri == security_policies.SecurityPolicyNone.URI:
            raise refuse(
                "the PLC asks for the password unencrypted on a Sign-only channel; "
                "use mode SignAndEncrypt"
            )
