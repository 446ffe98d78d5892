"""A simulated PLC as an OPC UA server: the station contract's nodes mapped onto ``SimPlc``.

The address space is the one linectl/contract.py describes: ``OPCUA_ROOT`` under Objects in
``OPCUA_NAMESPACE`` holds the PLC ``Heartbeat`` and one object per station; a station holds
CycleCount/SlotCount/ContractVersion and ``Slot<n>`` objects with a read-only ``Status`` array
and a ``Command`` method. Node ids are readable strings (``ns=2;s=LinectlStations.b1.Slot1.Status``)
so that an error message names the node a controls engineer would look for.

The station program changes its status from plain callbacks (timers, method calls), but
asyncua only writes a value through a coroutine (a write notifies subscriptions). So changes are
collected per node, latest value wins, and one housekeeping task owned by the server writes them:
one atomic write of the whole Status array per change, no task per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.node import Node

from linectl.config import OpcUaPlc
from linectl.contract import (
    CONTRACT_VERSION,
    OPCUA_COMMAND,
    OPCUA_CYCLE_COUNT,
    OPCUA_HEARTBEAT,
    OPCUA_NAMESPACE,
    OPCUA_ROOT,
    OPCUA_SLOT_COUNT,
    OPCUA_STATUS,
    OPCUA_VERSION,
    STATUS_FIELDS,
    slot_name,
    status_to_array,
)
from linectl.drivers.opcua_server_security import secure_server, stop_server
from simulators.station import SimPlc, SimStation

log = logging.getLogger(__name__)

DEFAULT_PORT = 4840
UInt32 = ua.VariantType.UInt32
UInt16 = ua.VariantType.UInt16


ALL_POLICIES = tuple(
    (policy, mode)
    for policy in ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
    for mode in ("Sign", "SignAndEncrypt")
)


@dataclass(frozen=True)
class ServerSecurity:
    """A secure-only simulated PLC: no None endpoint, no anonymous login, no remote admin,
    client certificates checked against ``trust``, users checked against ``users``."""

    certificate: Path
    private_key: Path
    trust: Path | Sequence[Path]  # client certificates (or their CAs) this PLC accepts
    application_uri: str
    users: Mapping[str, str] = field(default_factory=dict)  # user name -> password
    policies: Sequence[tuple[str, str]] = ALL_POLICIES  # (policy, mode) as in the line config


def _value(value: Any, kind: ua.VariantType, changed: datetime | None = None) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, kind), SourceTimestamp=changed)


class OpcUaSimServer:
    """One simulated PLC served over OPC UA on 127.0.0.1."""

    def __init__(
        self,
        plc_name: str,
        config: OpcUaPlc,
        plc: SimPlc,
        *,
        port: int | None = None,
        security: ServerSecurity | None = None,
    ) -> None:
        self.plc_name = plc_name
        self.security = security
        self.config = config
        self.plc = plc
        parts = urlsplit(config.url)
        self._path = parts.path
        self._port = (parts.port or DEFAULT_PORT) if port is None else port
        self.requests: Counter[str] = Counter()
        self._server: Server | None = None
        self._status_nodes: dict[tuple[str, int], ua.NodeId] = {}
        self._cycle_nodes: dict[str, ua.NodeId] = {}
        self._heartbeat_node: ua.NodeId | None = None
        # Latest value per node not yet written; insertion order keeps the writes in order.
        self._pending: dict[ua.NodeId, ua.DataValue] = {}
        self._dropped_sessions: list[Any] = []
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._housekeeper: asyncio.Task[None] | None = None
        plc.on_change(self._on_change)
        plc.on_heartbeat(self._on_heartbeat)

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self._port}{self._path}"

    def endpoint_config(self) -> OpcUaPlc:
        """The PLC's config with the URL this server really listens on."""
        parts = urlsplit(self.config.url)
        url = urlunsplit(("opc.tcp", f"127.0.0.1:{self._port}", parts.path, "", ""))
        return self.config.model_copy(update={"url": url})

    async def start(self) -> None:
        """Build the address space and listen on 127.0.0.1; returns once serving."""
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{self._port}{self._path}")
        server.set_server_name(f"linectl simulated PLC {self.plc_name}")
        if self.security is None:
            # Says plainly that it offers no security instead of warning about certificates.
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await _secure(server, self.security)
        # The clock task only refreshes ServerStatus.CurrentTime, and stop() would wait up to a
        # second for its sleep to end.
        server.disable_clock(True)
        try:
            await self._build(server)
            server.subscribe_server_callback(CallbackType.PreRead, self._count_read)
            await server.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await server.stop()
            raise
        assert server.bserver is not None
        self._port = server.bserver.port  # the real one when asked for port 0
        self._server = server
        self._housekeeper = asyncio.create_task(
            self._housekeeping(), name=f"opcua-sim-{self.plc_name}"
        )
        log.info("simulated PLC %s serving %s", self.plc_name, self.url)

    async def stop(self) -> None:
        """Stop listening, close every session and end every task the server started."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        self._pending.clear()
        self._dropped_sessions.clear()
        await stop_server(server)

    def drop_connections(self) -> None:
        """Cut every client connection now and forget their sessions (fault injection).

        The server keeps listening; a client has to connect and create a session again.
        """
        server = self._server
        if server is None or server.bserver is None:
            return
        for client in list(server.bserver.clients):
            if client.transport is not None:
                client.transport.abort()
        self._dropped_sessions.extend(server.iserver._external_sessions.values())
        self._wake.set()
        self.requests["dropped"] += 1

    # --- address space ------------------------------------------------------------------------

    async def _build(self, server: Server) -> None:
        idx = await server.register_namespace(OPCUA_NAMESPACE)
        root = await server.nodes.objects.add_object(
            ua.NodeId(OPCUA_ROOT, idx), f"{idx}:{OPCUA_ROOT}"
        )
        self._heartbeat_node = await self._variable(
            root,
            idx,
            f"{OPCUA_ROOT}.{OPCUA_HEARTBEAT}",
            OPCUA_HEARTBEAT,
            self.plc.heartbeat,
            UInt32,
        )
        for station in self.plc.stations.values():
            address = str(station.config.address)
            path = f"{OPCUA_ROOT}.{address}"
            obj = await root.add_object(ua.NodeId(path, idx), f"{idx}:{address}")
            self._cycle_nodes[station.name] = await self._variable(
                obj,
                idx,
                f"{path}.{OPCUA_CYCLE_COUNT}",
                OPCUA_CYCLE_COUNT,
                station.cycle_count,
                UInt32,
            )
            await self._variable(
                obj, idx, f"{path}.{OPCUA_SLOT_COUNT}", OPCUA_SLOT_COUNT, station.capacity, UInt16
            )
            await self._variable(
                obj, idx, f"{path}.{OPCUA_VERSION}", OPCUA_VERSION, CONTRACT_VERSION, UInt16
            )
            for slot in range(station.capacity):
                await self._build_slot(obj, idx, f"{path}.{slot_name(slot)}", station, slot)

    async def _build_slot(
        self, parent: Node, idx: int, path: str, station: SimStation, slot: int
    ) -> None:
        obj = await parent.add_object(ua.NodeId(path, idx), f"{idx}:{slot_name(slot)}")
        status = await obj.add_variable(
            ua.NodeId(f"{path}.{OPCUA_STATUS}", idx),
            f"{idx}:{OPCUA_STATUS}",
            ua.Variant(status_to_array(station.status(slot)), UInt32),
            datatype=ua.NodeId(ua.ObjectIds.UInt32),
        )
        await status.write_attribute(ua.AttributeIds.ValueRank, _value(1, ua.VariantType.Int32))
        await status.write_attribute(
            ua.AttributeIds.ArrayDimensions, _value([len(STATUS_FIELDS)], UInt32)
        )
        self._status_nodes[(station.name, slot)] = status.nodeid

        async def command(
            parent: ua.NodeId, seq: ua.Variant, code: ua.Variant, unit: ua.Variant
        ) -> list[ua.Variant] | ua.StatusCode:
            self.requests["call"] += 1
            if any(not isinstance(a.Value, int) for a in (seq, code, unit)):
                return ua.StatusCode(ua.StatusCodes.BadTypeMismatch)
            if not station.plc.program_running:
                # In STOP the PLC cannot evaluate: it says so and runs nothing (the contract).
                return ua.StatusCode(ua.StatusCodes.BadInvalidState)
            result = station.command(slot, seq.Value, code.Value, unit.Value)
            # The echo and the Status array agree: a Read after the call sees the new status.
            await self._flush()
            return [ua.Variant(result.ack_seq, UInt32), ua.Variant(int(result.cmd_status), UInt16)]

        await obj.add_method(
            ua.NodeId(f"{path}.{OPCUA_COMMAND}", idx),
            f"{idx}:{OPCUA_COMMAND}",
            command,
            [
                _argument("Seq", ua.ObjectIds.UInt32),
                _argument("Code", ua.ObjectIds.UInt16),
                _argument("Unit", ua.ObjectIds.UInt32),
            ],
            [_argument("AckSeq", ua.ObjectIds.UInt32), _argument("CmdStatus", ua.ObjectIds.UInt16)],
        )

    @staticmethod
    async def _variable(
        parent: Node, idx: int, nodeid: str, name: str, value: int, kind: ua.VariantType
    ) -> ua.NodeId:
        # add_variable makes a node readable only (AccessLevel CurrentRead): clients cannot
        # write what the PLC owns.
        node = await parent.add_variable(
            ua.NodeId(nodeid, idx),
            f"{idx}:{name}",
            ua.Variant(value, kind),
            datatype=ua.NodeId(getattr(ua.ObjectIds, kind.name)),
        )
        return node.nodeid

    # --- changes from the station program --------------------------------------------------

    def _on_change(self, station: SimStation, slot: int) -> None:
        if self._server is None:
            return
        node = self._status_nodes.get((station.name, slot))
        if node is None:  # a station of this PLC object that is served by another server
            return
        # SourceTimestamp: when the PLC changed the value, not when the server got to write it.
        now = datetime.now(UTC)
        self._pending[node] = _value(status_to_array(station.status(slot)), UInt32, now)
        self._pending[self._cycle_nodes[station.name]] = _value(station.cycle_count, UInt32, now)
        self._wake.set()

    def _on_heartbeat(self, heartbeat: int) -> None:
        if self._server is None or self._heartbeat_node is None:
            return
        self._pending[self._heartbeat_node] = _value(heartbeat, UInt32, datetime.now(UTC))
        self._wake.set()

    async def _flush(self) -> None:
        server = self._server
        if server is None:
            return
        async with self._write_lock:
            while self._pending:
                node = next(iter(self._pending))
                value = self._pending.pop(node)
                await server.write_attribute_value(node, value)

    async def _housekeeping(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            while self._dropped_sessions:
                await self._dropped_sessions.pop().close_session(True)

    def _count_read(self, event: ServerItemCallback, _service: object) -> None:
        if event.is_external:
            self.requests["read"] += 1


# --- security ---------------------------------------------------------------------------------


async def _secure(server: Server, security: ServerSecurity) -> None:
    await secure_server(
        server,
        certificate=security.certificate,
        private_key=security.private_key,
        trust=security.trust,
        application_uri=security.application_uri,
        policies=security.policies,
        users=security.users,
        operators=tuple(security.users),  # a PLC's users may call Command
    )


def _argument(name: str, datatype: int) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(datatype)
    arg.ValueRank = -1
    return arg
