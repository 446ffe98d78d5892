"""The OPC UA driver: one asyncua session per PLC, a subscription for changes, a heartbeat watchdog.

asyncua 2.1's ``Client`` starts two helpers with every ``connect()``: a connection supervisor
(which, with ``auto_reconnect=False``, only detects a loss and marks the client disconnected)
and a stale-subscription watchdog (which re-creates subscriptions on its own). This driver is
the one owner of reconnecting: it keeps auto-reconnect off, stops the stale watchdog, and
rebuilds the whole session whenever the transport closes, a request misses its deadline at
connect, the subscription reports a bad status, or the PLC heartbeat stops changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)

from linectl.config import OpcUaPlc, Station
from linectl.contract import (
    OPCUA_COMMAND,
    OPCUA_HEARTBEAT,
    OPCUA_NAMESPACE,
    OPCUA_ROOT,
    OPCUA_STATUS,
    CmdStatus,
    Command,
    ContractViolation,
    SlotStatus,
    slot_name,
    status_from_array,
)
from linectl.drivers.base import (
    EventSink,
)
from linectl.drivers.core import DriverCore
from linectl.drivers.opcua_security import secure_client
from linectl.errors import (
    CommandRefused,
    PlcConnectionLost,
    PlcError,
    PlcTimeout,
    ProtocolViolation,
)
from linectl.security import (
    PlcSecurityError,
)

log = logging.getLogger(__name__)


T = TypeVar("T")
SlotKey = tuple[str, int]

# Status codes that mean the session or channel is gone rather than the request being wrong.
_SESSION_GONE = {
    ua.StatusCodes.BadSessionClosed,
    ua.StatusCodes.BadSessionIdInvalid,
    ua.StatusCodes.BadSessionNotActivated,
    ua.StatusCodes.BadSecureChannelClosed,
    ua.StatusCodes.BadSecureChannelIdInvalid,
    ua.StatusCodes.BadConnectionClosed,
    ua.StatusCodes.BadServerHalted,
    ua.StatusCodes.BadShutdown,
    ua.StatusCodes.BadTimeout,
    ua.StatusCodes.BadTooManySessions,
}
# What a PLC means when it ends a secure connect with one of these.
_REFUSED = {
    ua.StatusCodes.BadCertificateUntrusted: "the PLC does not trust our certificate",
    ua.StatusCodes.BadCertificateTimeInvalid: (
        "the PLC finds our certificate expired or not valid yet"
    ),
    ua.StatusCodes.BadCertificateUriInvalid: (
        "the PLC finds our certificate's application URI differs from application_uri"
    ),
    ua.StatusCodes.BadCertificateUseNotAllowed: "the PLC does not accept our certificate's usages",
    ua.StatusCodes.BadCertificateInvalid: "the PLC finds our certificate invalid",
    ua.StatusCodes.BadCertificateRevoked: "the PLC has revoked our certificate",
    ua.StatusCodes.BadSecurityChecksFailed: "the PLC's security checks failed",
    ua.StatusCodes.BadSecurityPolicyRejected: "the PLC rejected the security policy",
    ua.StatusCodes.BadSecurityModeRejected: "the PLC rejected the security mode",
    ua.StatusCodes.BadIdentityTokenRejected: "the PLC does not accept this kind of login",
    ua.StatusCodes.BadIdentityTokenInvalid: "the PLC refused the login",
    ua.StatusCodes.BadUserAccessDenied: "the PLC refused the login",
}
_MONITORED_QUEUE = 8  # per Status item: keeps Execute -> Complete apart within one publish
# PublishRequests kept waiting at the PLC. asyncua's client sends the next only after the last
# one's answer is handled: a change in between waits a round trip. A server keeps more queued
# requests than it has subscriptions (OPC UA Part 4, 5.13.5), so two are always accepted.
PUBLISH_REQUESTS = 2


@dataclass
class _Nodes:
    """What one browse of the PLC's address space found."""

    ns: int
    heartbeat: ua.NodeId
    status: dict[SlotKey, ua.NodeId]
    command: dict[SlotKey, tuple[ua.NodeId, ua.NodeId]]  # (slot object, method)
    by_node: dict[ua.NodeId, SlotKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_node = {node: key for key, node in self.status.items()}


class OpcUaDriver(DriverCore):
    """One PLC over OPC UA: subscription (or polling) in, method calls out.

    The connection's life, the poll schedule, the heartbeat and what is told to the supervisor
    are ``DriverCore``'s; this class browses, reads, subscribes and calls.
    """

    protocol = "opcua"
    config: OpcUaPlc

    def __init__(
        self,
        name: str,
        config: OpcUaPlc,
        stations: Mapping[str, Station],
        sink: EventSink,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(name, config, stations, sink, rng=rng)
        self._client: Client | None = None
        self._nodes: _Nodes | None = None
        self._subscription: Subscription | None = None

    # --- the transport ------------------------------------------------------------------

    async def _open(self) -> None:
        client = self._client = self._make_client()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await self._secure(client)
                await client.connect()
        except PlcSecurityError as exc:
            self._failed(str(exc))
            raise
        except (TimeoutError, OSError, ua.UaError) as exc:
            error = self._translate(exc, "connect")
            self._failed(str(error))
            raise error from exc
        # asyncua's stale-subscription watchdog would re-create our subscription behind our
        # back (a second owner of recovery); our heartbeat watch replaces it.
        await _cancel_and_wait([client._stale_watchdog_task])
        client._stale_watchdog_task = None
        self._nodes = await self._resolve(client)
        if self.config.mode == "subscribe":
            # Before the first read: the initial notifications queue up and are told (if they
            # changed at all) after it, so nothing that changes in between is missed.
            self._subscription = await self._subscribe(client, self._nodes)

    async def _read_all(self, *, resync: bool) -> None:
        client, nodes = self._client, self._nodes
        assert client is not None and nodes is not None
        values = await self._read(client, nodes)
        now = self.now()
        self._on_heartbeat(_plain(values[-1]), now)
        for key, value in zip(nodes.status, values, strict=False):
            self._observe_value(key, nodes.status[key], value, now, resync=resync)

    async def _follow(self) -> None:
        client, nodes = self._client, self._nodes
        assert client is not None and nodes is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_transport(client))
            if self._subscription is not None:
                tg.create_task(self._watch_heartbeat())
                tg.create_task(self._consume(self._subscription, nodes))
                for n in range(1, PUBLISH_REQUESTS):
                    # Beside asyncua's own loop; its callback is synchronous, so answers are
                    # handled in the order they arrive, whichever loop's request they answer.
                    tg.create_task(
                        client.uaclient.session._publish_loop(), name=f"publish-{self.name}-{n}"
                    )
            else:
                tg.create_task(
                    self._poll_forever(
                        lambda: self._read_all(resync=False), self.config.poll_interval_s
                    )
                )

    async def _close(self) -> None:
        client, self._client, self._subscription = self._client, None, None
        if client is not None:
            await self._close_client(client)

    def _make_client(self) -> Client:
        """The one place a Client is built; ``_secure`` adds the security settings."""
        client = Client(
            self.config.url,
            timeout=self.config.timeout_s,
            # The supervisor's server-state probe only detects; with auto_reconnect off it
            # marks the client disconnected and our transport watch rebuilds.
            watchdog_intervall=self.config.heartbeat_timeout_s,
            auto_reconnect=False,
        )
        client.name = client.description = f"linectl {self.name}"
        # A session we abandon (lost connection) should not linger on the PLC for an hour.
        client.session_timeout = max(30_000, 10_000 * self.config.heartbeat_timeout_s)
        return client

    def _refuse(self, reason: str) -> PlcSecurityError:
        return PlcSecurityError(f"{self.where}: secure connect: {reason}", plc=self.name)

    async def _secure(self, client: Client) -> None:
        if self.config.security is not None:
            await secure_client(client, self.config.security, self._refuse)

    async def _close_client(self, client: Client) -> None:
        # asyncua's teardown (Client._cancel_task) swallows every CancelledError, also one aimed
        # at this task: run it as a task of its own, so a cancel reaches us and is not lost.
        closing = asyncio.create_task(self._disconnect(client), name=f"close-{self.name}")
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await asyncio.wait([closing])  # bounded by the deadline inside
            raise

    async def _disconnect(self, client: Client) -> None:
        with contextlib.suppress(TimeoutError, OSError, ua.UaError):
            async with asyncio.timeout(self.config.timeout_s):
                await client.disconnect()
        # disconnect() gives up early on a dead transport; make sure its helpers are gone.
        helpers = [
            client._supervisor_task,
            client._renew_channel_task,
            client._stale_watchdog_task,
            client.uaclient._publish_task,
        ]
        await _cancel_and_wait(helpers)

    # --- requests ---------------------------------------------------------------------------

    async def _request(self, what: str, aw: Awaitable[T], station: str | None = None) -> T:
        """Every request: one deadline, counted, asyncua errors translated once."""
        self._requests += 1
        started = self.now()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                result = await aw
        except TimeoutError as exc:
            error = self._translate(exc, what, station)
            self._consecutive_timeouts += 1
            self._failed(str(error), started=started)
            raise error from exc
        except (OSError, ua.UaError) as exc:
            error = self._translate(exc, what, station)
            self._failed(str(error), started=started)
            raise error from exc
        self._request_done(started)
        return result

    def _translate(self, exc: BaseException, what: str, station: str | None = None) -> PlcError:
        where = self.where + (f" station '{station}'" if station else "")
        if isinstance(exc, ua.UaStatusCodeError) and exc.code in _REFUSED and what == "connect":
            reason = _REFUSED[exc.code]
            if exc.code in (
                ua.StatusCodes.BadUserAccessDenied,
                ua.StatusCodes.BadIdentityTokenInvalid,
            ):
                sec = self.config.security
                user = sec.user if sec is not None and sec.user else None
                reason += f" of user '{user}'" if user else " (anonymous)"
            name = ua.StatusCode(exc.code).name
            return PlcSecurityError(f"{where}: secure connect: {reason} ({name})", plc=self.name)
        if (
            what == "connect"
            and self.config.security is None
            and "No matching endpoints" in str(exc)
        ):
            return PlcSecurityError(
                f"{where}: connect: the PLC offers no unsecured (None) endpoint; "
                f"configure plcs.{self.name}.security (docs/security.md)",
                plc=self.name,
            )
        if isinstance(exc, TimeoutError):
            return PlcTimeout(
                f"{where}: {what}: no answer within the deadline", plc=self.name, station=station
            )
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc) or type(exc).__name__
            return PlcConnectionLost(f"{where}: {what}: {reason}", plc=self.name, station=station)
        if isinstance(exc, ua.UaStatusCodeError):
            name = ua.StatusCode(exc.code).name
            kind = PlcConnectionLost if exc.code in _SESSION_GONE else ProtocolViolation
            return kind(f"{where}: {what}: {name}", plc=self.name, station=station)
        return ProtocolViolation(f"{where}: {what}: {exc}", plc=self.name, station=station)

    async def _resolve(self, client: Client) -> _Nodes:
        """Find every node of the contract in one TranslateBrowsePaths request."""
        namespaces = await self._request("read NamespaceArray", client.get_namespace_array())
        if OPCUA_NAMESPACE not in namespaces:
            raise ProtocolViolation(
                f"{self.where}: namespace {OPCUA_NAMESPACE} is not served", plc=self.name
            )
        ns = namespaces.index(OPCUA_NAMESPACE)
        wanted: list[tuple[str | None, list[str]]] = [(None, [OPCUA_ROOT, OPCUA_HEARTBEAT])]
        for name, st in self.stations.items():
            for slot in range(st.capacity):
                base = [OPCUA_ROOT, str(st.address), slot_name(slot)]
                wanted += [
                    (name, base),
                    (name, [*base, OPCUA_STATUS]),
                    (name, [*base, OPCUA_COMMAND]),
                ]
        paths = [_browse_path(ns, names) for _, names in wanted]
        results = await self._request(
            "translate browse paths", client.uaclient.translate_browsepaths_to_nodeids(paths)
        )
        found: list[ua.NodeId] = []
        for (station, names), result in zip(wanted, results, strict=True):
            if not result.StatusCode.is_good() or not result.Targets:
                at = f" station '{station}'" if station else ""
                path = "/".join(["Objects", *(f"{ns}:{n}" for n in names)])
                raise ProtocolViolation(
                    f"{self.where}{at}: no node at browse path {path} "
                    f"({ua.StatusCode(result.StatusCode.value).name})",
                    plc=self.name,
                    station=station,
                )
            target = result.Targets[0].TargetId
            found.append(ua.NodeId(target.Identifier, target.NamespaceIndex))
        it = iter(found[1:])
        status: dict[SlotKey, ua.NodeId] = {}
        command: dict[SlotKey, tuple[ua.NodeId, ua.NodeId]] = {}
        for name, st in self.stations.items():
            for slot in range(st.capacity):
                obj, status[(name, slot)], method = next(it), next(it), next(it)
                command[(name, slot)] = (obj, method)
        return _Nodes(ns, found[0], status, command)

    async def _read(self, client: Client, nodes: _Nodes) -> list[ua.DataValue]:
        """Every Status array and the heartbeat, in one Read request."""
        params = ua.ReadParameters()
        for node in [*nodes.status.values(), nodes.heartbeat]:
            rv = ua.ReadValueId()
            rv.NodeId = node
            rv.AttributeId = ua.AttributeIds.Value
            params.NodesToRead.append(rv)
        return await self._request("read status", client.uaclient.read(params))

    async def _subscribe(self, client: Client, nodes: _Nodes) -> Subscription:
        items = [*nodes.status.values(), nodes.heartbeat]
        subscription = await self._request(
            "create subscription",
            client.create_subscription(
                _subscription_parameters(self.config.publishing_interval_s),
                None,
                # A full queue means we fell behind: rebuild and resync rather than drop changes.
                queue_maxsize=max(1000, 4 * _MONITORED_QUEUE * len(items)),
                overflow=OverflowPolicy.DISCONNECT,
            ),
        )
        handles = await self._request(
            "create monitored items",
            subscription.subscribe_data_change(
                [client.get_node(n) for n in items], queuesize=_MONITORED_QUEUE, sampling_interval=0
            ),
        )
        for node, handle in zip(items, handles, strict=True):
            if isinstance(handle, ua.StatusCode):
                raise ProtocolViolation(
                    f"{self.where}: cannot monitor node {node.to_string()}: {handle.name}",
                    plc=self.name,
                )
        return subscription

    # --- watching -----------------------------------------------------------------------------

    async def _watch_transport(self, client: Client) -> None:
        async with client.uaclient.subscribe_state() as states:
            while client.uaclient.state is UaClientState.CONNECTED:
                await states.next_change()
        raise PlcConnectionLost(f"{self.where}: connection closed", plc=self.name)

    async def _consume(self, subscription: Subscription, nodes: _Nodes) -> None:
        async for event in subscription:
            if isinstance(event, StatusChangeEvent):
                status = event.notification.Status
                raise PlcConnectionLost(
                    f"{self.where}: subscription status {status.name}", plc=self.name
                )
            if not isinstance(event, DataChangeEvent):
                continue
            self._notifications += 1
            node = event.node.nodeid
            value = event.data.monitored_item.Value
            if node == nodes.heartbeat:
                self._on_heartbeat(_plain(value), self.now())
            elif (key := nodes.by_node.get(node)) is not None:
                self._observe_value(key, node, value, self.now())
        raise PlcConnectionLost(f"{self.where}: subscription ended", plc=self.name)

    def _observe_value(
        self,
        key: SlotKey,
        node: ua.NodeId,
        value: ua.DataValue | None,
        at: float,
        *,
        resync: bool = False,
    ) -> None:
        """Decode one Status array; the core checks it and tells a change."""
        station, slot = key
        try:
            raw = _plain(value)
            if not isinstance(raw, list):
                status_code = value.StatusCode.name if value and value.StatusCode else "no value"
                raise ContractViolation(f"Status is not an array ({status_code})", 0)
            status = status_from_array(raw)
        except ContractViolation as exc:
            self._violate(station, slot, str(exc), at)
            return
        self._observe(station, slot, status, at, resync=resync)

    def _slot_where(self, station: str, slot: int | None) -> str:
        if slot is None or self._nodes is None:
            return super()._slot_where(station, slot)
        node = self._nodes.status[(station, slot)]
        return f"{self.where} station '{station}' node {node.to_string()}"

    # --- commands -----------------------------------------------------------------------------

    async def command(
        self, station: str, slot: int, seq: int, code: Command, unit: int
    ) -> SlotStatus:
        client, nodes = self._client, self._nodes
        if client is None or nodes is None or not self.connected:
            raise PlcConnectionLost(
                f"{self.where} station '{station}': not connected", plc=self.name, station=station
            )
        key = (station, slot)
        if key not in nodes.command:
            raise ValueError(f"{self.where} has no station '{station}' slot {slot}")
        self._guard.commanded(key, unit)
        obj, method = nodes.command[key]
        request = ua.CallMethodRequest()
        request.ObjectId = obj
        request.MethodId = method
        request.InputArguments = [
            ua.Variant(seq, ua.VariantType.UInt32),
            ua.Variant(int(code), ua.VariantType.UInt16),
            ua.Variant(unit, ua.VariantType.UInt32),
        ]
        what = f"call {method.to_string()}"
        try:
            (result,) = await self._request(what, client.uaclient.call([request]), station)
        except ProtocolViolation as exc:  # a service fault: unconfirmed, as a timeout is
            raise PlcTimeout(str(exc), plc=self.name, station=station) from exc
        if not result.StatusCode.is_good():
            # The PLC could not evaluate the command (docs/plc-interface.md, section 3): it was
            # not run, so the caller sends the same sequence number again, as after a timeout.
            name = ua.StatusCode(result.StatusCode.value).name
            raise PlcTimeout(
                f"{self.where} station '{station}' slot {slot}: the PLC did not evaluate command "
                f"{code.name} seq {seq}: {name}",
                plc=self.name,
                station=station,
            )
        try:
            ack_seq, verdict = (v.Value for v in result.OutputArguments)
            verdict = CmdStatus(verdict)
        except (ua.UaError, ValueError, TypeError) as exc:
            # Outside the contract, so unconfirmed: the caller sends the same number again.
            raise PlcTimeout(
                f"{self.where} station '{station}' node {method.to_string()}: bad answer: {exc}",
                plc=self.name,
                station=station,
            ) from exc
        if ack_seq != seq:
            raise PlcTimeout(
                f"{self.where} station '{station}' node {method.to_string()}: "
                f"echoed seq {ack_seq} for seq {seq}",
                plc=self.name,
                station=station,
            )
        # The whole array follows through the subscription; the echo fields are authoritative.
        last = self._last.get(key) or SlotStatus()
        status = replace(last, ack_seq=ack_seq, cmd_status=verdict)
        if verdict != CmdStatus.ACCEPTED:
            raise CommandRefused(
                f"{self.where} station '{station}' slot {slot}: command {code!r} seq {seq} "
                f"unit {unit} refused: {verdict.name}",
                plc=self.name,
                station=station,
            )
        return status


async def _cancel_and_wait(tasks: list[asyncio.Task[Any] | None]) -> None:
    """Cancel helper tasks and wait for their end without swallowing our own cancellation."""
    pending = [t for t in tasks if t is not None and not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def _subscription_parameters(interval_s: float) -> ua.CreateSubscriptionParameters:
    params = ua.CreateSubscriptionParameters()
    params.RequestedPublishingInterval = interval_s * 1000
    # Values the server keeps as asked, so asyncua does not warn and modify the subscription.
    params.RequestedLifetimeCount = 10_000
    params.RequestedMaxKeepAliveCount = 10
    params.MaxNotificationsPerPublish = 0  # no limit
    params.PublishingEnabled = True
    return params


def _browse_path(ns: int, names: list[str]) -> ua.BrowsePath:
    path = ua.BrowsePath()
    path.StartingNode = ua.NodeId(ua.ObjectIds.ObjectsFolder)
    for name in names:
        el = ua.RelativePathElement()
        el.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
        el.IsInverse = False
        el.IncludeSubtypes = True
        el.TargetName = ua.QualifiedName(name, ns)
        path.RelativePath.Elements.append(el)
    return path


def _plain(value: ua.DataValue | None) -> Any:
    if value is None or value.Value is None:
        return None
    if value.StatusCode is not None and not value.StatusCode.is_good():
        return None
    return value.Value.Value
