"""A simulated PLC's stations exposed as Modbus TCP holding registers.

The register map is the contract's (linectl/contract.py): each station is one block of
``block_words(capacity)`` holding registers at its ``address`` (0-based protocol address).
Reads come live from ``SimStation.words()``; the only write accepted is one slot's whole command
area (``COMMAND_WORDS`` registers at ``command_address``), which runs ``SimStation.command``.

Addressing policy: every register from the first station block to the end of the last one is
readable, and gaps between blocks read as 0, so a controller can cover several stations with
one read. A read reaching outside that span, and any other write (status registers, a partial
command area), gets ILLEGAL_DATA_ADDRESS. It serves FC3 and FC16 only: every other function
code gets ILLEGAL_FUNCTION; a read of 0 or more than 125 registers (a write of 0 or more than
123) gets ILLEGAL_DATA_VALUE; a request for another unit id gets GATEWAY_TARGET_DEVICE_FAILED_
TO_RESPOND (0x0B), as docs/plc-interface.md says a PLC answers them.

With ``tls`` (and its ``sim`` section) in the PLC's config, or an SSL context given, the server
speaks Modbus/TCP Security: TLS requiring a client certificate its client CA issued.

pymodbus 3.16 plugs a data source in through ``SimDevice(action=...)``: the action runs on every
access, may refresh the register list in place before a read, and may refuse with an ExcCodes.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
import ssl
import struct
from collections import Counter
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest
from pymodbus.server import ModbusTcpServer, ModbusTlsServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import DataType, SimData, SimDevice

from linectl.config import ModbusPlc
from linectl.contract import COMMAND_WORDS, block_words, command_address, decode_command
from linectl.errors import ConfigError
from linectl.tls import server_context
from simulators.station import SimPlc, SimStation

_KINDS = {3: "read", 4: "read_input", 6: "write_single", 16: "write", 23: "read_write"}
SERVED = (3, 16)  # Read Holding Registers, Write Multiple Registers: all the contract uses


class _ReadHolding(ReadHoldingRegistersRequest):
    """FC3 whose count is judged when answered, so 0 or more than 125 registers gets
    ILLEGAL_DATA_VALUE (pymodbus' own decoder drops it and answers function code 0x80)."""

    def decode(self, data: bytes) -> None:
        self.address, self.count = struct.unpack(">HH", data[:4])

    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        if not 1 <= self.count <= self.MAX_COUNT:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
        return await super().datastore_update(context, device_id)


def _refused(code: int) -> type[ModbusPDU]:
    """A request of a function code the PLC does not serve: ILLEGAL_FUNCTION, whatever it is."""

    class Refused(ModbusPDU):
        function_code = code

        def decode(self, data: bytes) -> None:
            pass

        async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)

    return Refused


_PDUS: list[type[ModbusPDU]] = [
    _ReadHolding,
    *(_refused(code) for code in range(1, 128) if code not in SERVED),
]


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    return ""


class ModbusSimServer:
    """One simulated PLC on one Modbus TCP port (loopback only).

    It serves TLS with ``sslctx`` (a server context, see linectl.tls.server_context) or, when
    none is given, with the certificate, key and client CA of the config's ``tls.sim``.
    """

    def __init__(
        self,
        plc_name: str,
        config: ModbusPlc,
        plc: SimPlc,
        *,
        port: int | None = None,
        sslctx: ssl.SSLContext | None = None,
    ) -> None:
        self.plc_name = plc_name
        self.config = config
        self.plc = plc
        self.requests: Counter[str] = Counter()
        self.connections_accepted = 0
        self._host = _loopback(config.host)
        if not self._host:
            raise ConfigError(
                [
                    f"plc '{plc_name}' ({config.where}): the simulator only binds a loopback "
                    f"address; host '{config.host}' is not one (use 127.0.0.1)"
                ]
            )
        self._want_port = config.port if port is None else port
        self.sslctx = sslctx or _sim_context(plc_name, config)
        self._server: ModbusTcpServer | None = None
        self._bound_port = 0
        self._stalled = False
        # Station blocks sorted by base register, for bisecting a request onto stations.
        blocks = sorted(
            (int(st.config.address), block_words(st.capacity), st) for st in plc.stations.values()
        )
        self._bases = [b for b, _, _ in blocks]
        self._blocks = blocks
        self._commands: dict[int, tuple[SimStation, int]] = {
            command_address(base, slot): (st, slot)
            for base, _, st in blocks
            for slot in range(st.capacity)
        }
        self._lo = blocks[0][0] if blocks else 0
        self._hi = max((b + n for b, n, _ in blocks), default=1)

    @property
    def port(self) -> int:
        return self._bound_port

    @property
    def client_count(self) -> int:
        """Client connections open right now."""
        if self._server is None:
            return 0
        # pymodbus registers a connection when TCP accepts it; a TLS handshake that fails
        # afterwards never tells it, so it keeps an entry without a transport.
        return sum(c.transport is not None for c in self._server.active_connections.values())

    def endpoint_config(self) -> ModbusPlc:
        return self.config.model_copy(update={"port": self._bound_port})

    async def start(self) -> None:
        """Listen on the loopback address; returns once connections are accepted."""
        devices = [
            SimDevice(
                id=self.config.unit_id,
                simdata=[
                    SimData(self._lo, count=self._hi - self._lo, datatype=DataType.REGISTERS)
                ],
                action=self._action,
            )
        ]
        if self.config.unit_id != 0:
            # pymodbus hands a request for an unknown unit id to device 0: make that one answer
            # as a PLC does for a unit it is not (with unit id 0 configured, it answers all).
            devices.append(
                SimDevice(
                    id=0,
                    simdata=[SimData(0, count=65536, datatype=DataType.REGISTERS)],
                    action=_other_unit,
                )
            )
        hooks = {
            "trace_pdu": self._trace_pdu,
            "trace_connect": self._trace_connect,
            "custom_pdu": _PDUS,
        }
        address = (self._host, self._want_port)
        server = (
            ModbusTcpServer(devices, address=address, **hooks)
            if self.sslctx is None
            else ModbusTlsServer(devices, address=address, sslctx=self.sslctx, **hooks)
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            await server.shutdown()
            raise OSError(
                f"plc '{self.plc_name}': cannot listen on {self._host}:{self._want_port}: "
                f"{self._bind_error() or exc}"
            ) from exc
        self._server = server
        self._bound_port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        # A restart (fault injection: the PLC rebooting) comes back on the same port.
        self._want_port = self._bound_port

    def _bind_error(self) -> str:
        """pymodbus logs why listening failed and raises a bare RuntimeError: find out why."""
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self._host, self._want_port))
            except OSError as exc:
                return str(exc)
        return ""

    async def stop(self) -> None:
        """Close the listening socket and every client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        listener = server.transport
        await server.shutdown()
        if listener is not None:
            await listener.wait_closed()  # type: ignore[attr-defined]
        # pymodbus keeps the last server in a class attribute; do not keep ours alive.
        if ModbusBaseServer.active_server is server:
            ModbusBaseServer.active_server = None

    def drop_connections(self) -> None:
        """Close every client connection now; the server keeps listening (fault injection)."""
        if self._server is None:
            return
        for conn in list(self._server.active_connections.values()):
            conn.close()

    def stall(self, stalled: bool = True) -> None:
        """Stop (or resume) answering requests while keeping connections open: a half-open
        connection as the client sees it (fault injection)."""
        self._stalled = stalled
        self._apply_stall()

    def _apply_stall(self) -> None:
        if self._server is None:
            return
        for conn in self._server.active_connections.values():
            transport = conn.transport
            if transport is None:
                continue
            if self._stalled:
                transport.pause_reading()  # type: ignore[attr-defined]
            else:
                transport.resume_reading()  # type: ignore[attr-defined]

    # --- pymodbus hooks -----------------------------------------------------------------------

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            fc = pdu.function_code
            self.requests[_KINDS.get(fc, f"fc{fc}")] += 1
        return pdu

    def _trace_connect(self, connected: bool) -> None:
        if connected:
            self.connections_accepted += 1
            if self._stalled:
                self._apply_stall()

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: Any,
    ) -> ExcCodes | None:
        if address < self._lo or address + count > self._hi:
            return ExcCodes.ILLEGAL_ADDRESS
        if values is not None:
            return self._write(address, count, values)
        self._refresh(registers, start_address, address, count)
        return None

    def _write(self, address: int, count: int, values: list[int]) -> ExcCodes | None:
        target = self._commands.get(address)
        if target is None or count != COMMAND_WORDS:
            return ExcCodes.ILLEGAL_ADDRESS
        station, slot = target
        station.command(slot, *decode_command(values))
        return None

    def _refresh(self, registers: list[int], start: int, address: int, count: int) -> None:
        """Copy the live words of every station overlapping the read into ``registers``."""
        end = address + count
        i = max(bisect.bisect_right(self._bases, address) - 1, 0)
        for base, size, station in self._blocks[i:]:
            if base >= end:
                break
            if base + size <= address:
                continue
            registers[base - start : base - start + size] = station.words()


async def _other_unit(*_: Any) -> ExcCodes:
    return ExcCodes.GATEWAY_NO_RESPONSE


def _sim_context(plc_name: str, config: ModbusPlc) -> ssl.SSLContext | None:
    tls = config.tls
    if tls is None:
        return None
    if tls.sim is None:
        raise ConfigError(
            [
                f"plcs.{plc_name}.tls.sim: required to simulate a Modbus/TCP Security PLC: "
                "its certificate, private_key and client_ca"
            ]
        )
    return server_context(
        tls.sim.certificate,
        tls.sim.private_key,
        tls.sim.client_ca,
        min_version=tls.min_version,
        path=f"plcs.{plc_name}.tls.sim",
    )
