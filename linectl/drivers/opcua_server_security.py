"""Server-side OPC UA security, shared by the simulated PLC and linectl's northbound server.

asyncua's Server is open by default: a None endpoint, anonymous login, any client certificate,
and a user manager that makes anyone who calls himself "admin" an administrator, whatever the
password. ``secure_server`` turns each of these off: only the configured policies, user name
login over a channel secured by a trusted client certificate (and, only when asked for,
anonymous read-only login), no remote admin; tests/test_opcua_security.py and
tests/test_northbound_opcua.py prove it. ``stop_server`` stops one without leaving its
connections' and sessions' tasks behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from struct import unpack_from
from typing import Any, ClassVar

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies, uacrypto
from asyncua.crypto.permission_rules import (
    ADMIN_TYPES,
    USER_TYPES,
    PermissionRuleset,
    User,
    UserRole,
)
from cryptography import x509

from linectl.security import CertificateRejected, TrustList, secret_digest

log = logging.getLogger(__name__)


async def secure_server(
    server: Server,
    *,
    certificate: Path,
    private_key: Path,
    trust: Path | Sequence[Path],
    application_uri: str,
    policies: Sequence[tuple[str, str]],
    users: Mapping[str, str],
    operators: Collection[str] = (),
    allow_anonymous: bool = False,
    max_sessions: int | None = None,
) -> None:
    """Make ``server`` secure before ``start()``. ``policies`` are (policy, mode) pairs as in
    the line config; ``users`` maps user names to passwords; ``operators`` (a subset) may call
    methods; ``allow_anonymous`` adds a None endpoint with anonymous, read-only sessions."""
    trusted = TrustList.load(trust if isinstance(trust, Path) else list(trust))
    await server.load_certificate(str(certificate))
    await server.load_private_key(str(private_key))
    await server.set_application_uri(application_uri)
    types = [
        getattr(ua.SecurityPolicyType, f"{policy.replace('_', '')}_{mode}")
        for policy, mode in policies
    ]
    if allow_anonymous:
        types.append(ua.SecurityPolicyType.NoSecurity)
    server.set_security_policy(types, permission_ruleset=_Permissions(operators, allow_anonymous))
    tokens: list[type] = [ua.UserNameIdentityToken]
    if allow_anonymous:
        tokens.append(ua.AnonymousIdentityToken)
    server.set_identity_tokens(tokens)
    server.allow_remote_admin(False)
    iserver = server.iserver
    iserver.set_user_manager(_UserManager(users, trusted, allow_anonymous, max_sessions))
    server.set_certificate_validator(_ClientValidator(trusted))
    # asyncua strips the server nonce from a decrypted password without comparing it, so an
    # encrypted password seen once on a Sign-only channel could be replayed into a new session.
    iserver.decrypt_user_token = _NonceCheckingDecrypt(iserver)  # type: ignore[method-assign]
    # start() appends the real policy factories to this same list, after ours.
    server._policies.append(_RefuseOtherPolicies(server._policies))


def anonymous_read_only(server: Server, max_sessions: int | None = None) -> None:
    """Only a None endpoint with anonymous, read-only sessions: no password, no method."""
    server.set_security_policy(
        [ua.SecurityPolicyType.NoSecurity], permission_ruleset=_Permissions((), True)
    )
    server.set_identity_tokens([ua.AnonymousIdentityToken])
    server.allow_remote_admin(False)
    server.iserver.set_user_manager(_UserManager({}, TrustList(()), True, max_sessions))


_CALL = ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)
_WRITE = ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)
_READ_ONLY = frozenset(ua.NodeId(t) for t in USER_TYPES) - {_CALL, _WRITE}
assert not _READ_ONLY & {ua.NodeId(t) for t in ADMIN_TYPES}


class _Permissions(PermissionRuleset):
    """Reading, browsing and subscribing for every logged-in user (and anonymous ones when
    allowed); calling methods only for operators; writing and changing the address space for
    nobody."""

    def __init__(self, operators: Collection[str], allow_anonymous: bool) -> None:
        self._operators = frozenset(operators)
        self._roles = {UserRole.User, UserRole.Anonymous} if allow_anonymous else {UserRole.User}

    def check_validity(self, user: User | None, action_type_id: ua.NodeId, body: Any) -> bool:
        if user is None or user.role not in self._roles:
            return False
        if action_type_id == _CALL:
            return user.role == UserRole.User and user.name in self._operators
        return action_type_id in _READ_ONLY


class _PolicyRejected(ua.uaerrors.BadRequestTooLarge):
    code = ua.StatusCodes.BadSecurityPolicyRejected


# Defining a subclass registers it process-wide as *the* class of its code; undo that, so a
# client in this process still gets asyncua's own BadSecurityPolicyRejected.
ua.uaerrors.UaStatusCodeError._subclasses[_PolicyRejected.code] = (
    ua.uaerrors.BadSecurityPolicyRejected
)


class _RefuseOtherPolicies:
    """Answer an OpenSecureChannel for a policy the PLC does not offer (Basic256, Basic128Rsa15)
    with an error, at once.

    asyncua raises inside the connection's message loop, logs it and leaves the client waiting
    for an answer until its own timeout. This factory matches what no real one does and raises
    the one error asyncua answers with an ERR message and a closed connection. The None policy
    stays asyncua's: any client may open a None channel to ask for the endpoints.
    """

    def __init__(self, factories: list[Any]) -> None:
        self._factories = factories

    def matches(self, uri: str, mode: ua.MessageSecurityMode | None = None) -> bool:
        offered = {f.cls.URI for f in self._factories if f is not self}
        return uri not in offered and uri != security_policies.SecurityPolicyNone.URI

    def create(self, peer_certificate: bytes | None) -> Any:
        raise _PolicyRejected()


class _ClientValidator:
    """CreateSession: the client's certificate must be trusted, valid and name its URI."""

    def __init__(self, trust: TrustList) -> None:
        self._trust = trust

    async def __call__(self, cert: x509.Certificate, client: ua.ApplicationDescription) -> None:
        try:
            self._trust.check(cert, application_uri=client.ApplicationUri, peer="client")
        except CertificateRejected as exc:
            log.warning("refused client %r: %s", client.ApplicationUri, exc.reason)
            raise ServiceError(getattr(ua.StatusCodes, exc.status)) from None


class _UserManager:
    """ActivateSession: a known user with the right password, over a channel secured by a
    trusted client certificate.

    asyncua hands the user manager the secure channel's client certificate. Checking it here,
    too, matters: the CreateSession validator only sees the certificate the client *claims* in
    CreateSession (which may differ from the one the channel was opened with, or be absent), and
    a None channel (no certificate) can still create a session on a server without a None
    endpoint.
    """

    def __init__(
        self,
        users: Mapping[str, str],
        trust: TrustList,
        allow_anonymous: bool = False,
        max_sessions: int | None = None,
    ) -> None:
        self._users = {name: secret_digest(pw) for name, pw in users.items()}
        self._trust = trust
        self._anonymous = allow_anonymous
        self._max_sessions = max_sessions

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: bytes | None = None,
    ) -> User | None:
        if self._max_sessions is not None:
            active = sum(1 for s in iserver._external_sessions.values() if s.is_activated())
            if active >= self._max_sessions:
                log.warning("refused login of %r: %d sessions already", username, active)
                return None
        if username is None and password is None and self._anonymous:
            return User(role=UserRole.Anonymous)
        if not certificate:  # b"" on a None channel
            log.warning("refused login of %r: no secure channel", username)
            return None
        try:
            cert = x509.load_der_x509_certificate(certificate)
            self._trust.check(cert, application_uri=None, peer="client")
        except (ValueError, CertificateRejected) as exc:
            log.warning("refused login of %r: channel certificate: %s", username, exc)
            return None
        expected = self._users.get(username or "")
        # Compare digests in constant time, also for unknown users, so timing tells nothing.
        given = secret_digest(password or "")
        if not hmac.compare_digest(given, expected or secret_digest("\0unknown")) or not expected:
            log.warning("refused login of %r: unknown user or wrong password", username)
            return None
        return User(role=UserRole.User, name=username)


class _NonceCheckingDecrypt:
    """InternalServer.decrypt_user_token, also checking the session's nonce in the token."""

    _ALGORITHMS: ClassVar[dict[str, Callable[[Any, bytes], bytes]]] = {
        "http://www.w3.org/2001/04/xmlenc#rsa-oaep": uacrypto.decrypt_rsa_oaep,
        "http://opcfoundation.org/UA/security/rsa-oaep-sha2-256": uacrypto.decrypt_rsa_oaep_sha256,
    }

    def __init__(self, iserver: Any) -> None:
        self._iserver = iserver

    def __call__(self, isession: Any, token: ua.UserNameIdentityToken) -> tuple[str, str]:
        password = token.Password or b""
        if not token.EncryptionAlgorithm:  # the channel itself is encrypted
            return token.UserName, password.decode("utf-8")
        decrypt = self._ALGORITHMS.get(token.EncryptionAlgorithm)
        if decrypt is None:  # rsa-1_5 belongs to the deprecated policies
            raise ServiceError(ua.StatusCodes.BadIdentityTokenInvalid)
        raw = decrypt(self._iserver.private_key, password)
        length = unpack_from("<I", raw)[0]
        nonce = isession.nonce or b""
        secret, tail = raw[4 : 4 + length - len(nonce)], raw[4 + length - len(nonce) : 4 + length]
        if not hmac.compare_digest(tail, nonce):
            raise ServiceError(ua.StatusCodes.BadIdentityTokenInvalid)
        return token.UserName, secret.decode("utf-8")


async def stop_server(server: Server) -> None:
    """Stop an asyncua server and everything it started, before returning.

    ``Server.stop`` leaves work behind: closed transports report connection_lost only on a
    later loop turn, and asyncua queues each connection's cleanup then; and a session with
    subscriptions stays alive after its connection is gone (for a client to reactivate) until
    its own timer closes it, so its timer tasks leak and asyncua's process-wide session count
    never comes down. End all of it now.
    """
    bserver = server.bserver
    connections = list(bserver.clients) if bserver is not None else []
    await server.stop()
    if bserver is not None:
        for conn in connections:
            if conn.transport is not None:
                conn.transport.abort()
        for conn in connections:
            for task in (conn._task, conn._activation_watchdog_task):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        await bserver._close_tasks()
    for session in list(server.iserver._external_sessions.values()):
        await session.close_session(True)
