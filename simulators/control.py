"""Run a line's simulated PLCs as a process, with a small HTTP control interface over them.

``linectl sim`` calls ``serve``: every PLC of the config on its port (``SimLine``), plus a
``ControlServer`` on 127.0.0.1 through which tests and demos in another process inject faults
and read the stations' counters. docs/simulators.md describes the routes.

The HTTP side is deliberately tiny (HTTP/1.1, JSON bodies with Content-Length, one request per
connection) so that it needs nothing beyond asyncio streams. ``ControlServer.respond`` is a
plain function of (method, path, body), tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import signal
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from linectl.config import Line
from simulators.runner import SimLine
from simulators.station import SimStation

MAX_BODY = 64 * 1024  # a control request is a few dozen bytes
MAX_HEADERS = 100
REQUEST_TIMEOUT_S = 10.0  # a client that opens a connection and sends nothing is dropped
VIOLATIONS = ("state", "unit", "seq")

Reply = tuple[int, dict[str, Any]]


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class ControlServer:
    """HTTP/1.1 JSON control of a running ``SimLine``, bound to 127.0.0.1 only."""

    def __init__(self, sim: SimLine, port: int = 0) -> None:
        self.sim = sim
        self._want_port = port
        self._server: asyncio.Server | None = None
        # The connection handlers asyncio starts for us, with their streams; stop() ends them.
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any]], Reply]] = {
            ("GET", "/"): self._index,
            ("GET", "/counters"): self._counters,
            ("POST", "/fault"): self._fault,
            ("POST", "/freeze"): self._freeze,
            ("POST", "/drop"): self._drop,
            ("POST", "/violate"): self._violate,
        }

    @property
    def port(self) -> int:
        if self._server is None:
            return 0
        return self._server.sockets[0].getsockname()[1]

    @property
    def connection_count(self) -> int:
        """Client connections being served right now."""
        return len(self._clients)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self._want_port, limit=MAX_BODY
            )
        except OSError as exc:
            raise OSError(
                f"control interface: cannot listen on 127.0.0.1:{self._want_port}: {exc}"
            ) from exc

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Closing a handler's connection ends its read with EOF, so it finishes on its own.
        # (Cancelling it instead makes Python 3.11's stream callback log the CancelledError.)
        for writer in self._clients.values():
            writer.close()
        handlers = list(self._clients)
        if handlers:
            await asyncio.wait(handlers)
        await server.wait_closed()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._server is None:  # accepted just before stop(): do not outlive it
            writer.close()
            return
        self._clients[task] = writer
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    method, path, body = await _read_request(reader)
                status, reply = self.respond(method, path, body)
            except _HttpError as exc:
                status, reply = exc.status, {"error": str(exc)}
            except TimeoutError:
                status, reply = 408, {"error": f"no complete request within {REQUEST_TIMEOUT_S} s"}
            writer.write(_response(status, reply))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nobody is left to tell
        finally:
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def respond(self, method: str, path: str, body: bytes) -> Reply:
        """The reply to one request: (HTTP status, JSON object)."""
        route = self.routes.get((method, path))
        if route is None:
            allowed = sorted(m for m, p in self.routes if p == path)
            if allowed:
                return 405, {"error": f"{method} {path}: method not allowed; use {allowed[0]}"}
            return 404, {"error": f"no route {method} {path}", "routes": self._route_names()}
        try:
            args = json.loads(body) if body.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return 400, {"error": f"{method} {path}: body is not JSON: {exc}"}
        if not isinstance(args, dict):
            return 400, {"error": f"{method} {path}: body must be a JSON object"}
        try:
            return route(args)
        except _HttpError as exc:
            return exc.status, {"error": f"{method} {path}: {exc}"}

    def _route_names(self) -> list[str]:
        return [f"{m} {p}" for m, p in self.routes]

    # --- routes ---------------------------------------------------------------------------------

    def _index(self, _args: dict[str, Any]) -> Reply:
        plcs = {
            name: {"protocol": cfg.protocol, "where": cfg.where, "stations": sorted(plc.stations)}
            for name, plc in self.sim.plcs.items()
            for cfg in [self.sim.line.plcs[name]]
        }
        return 200, {"line": self.sim.line.line, "plcs": plcs, "routes": self._route_names()}

    def _counters(self, _args: dict[str, Any]) -> Reply:
        stations = {n: st for plc in self.sim.plcs.values() for n, st in plc.stations.items()}

        def per_unit(kind: str) -> dict[str, dict[str, int]]:
            return {
                n: {str(unit): count for unit, count in sorted(getattr(st, kind).items())}
                for n, st in stations.items()
            }

        return 200, {
            "completions": per_unit("completions"),
            "starts": per_unit("starts"),
            "aborts": per_unit("aborts"),
            "cycle_count": {n: st.cycle_count for n, st in stations.items()},
            "commands": {
                n: {"evaluated": st.commands_evaluated, "repeated": st.commands_repeated}
                for n, st in stations.items()
            },
        }

    def _fault(self, args: dict[str, Any]) -> Reply:
        station, slot = self._slot(args)
        code = _int(args, "code", None, 1, 0xFFFF)
        station.fault(slot, code)
        status = station.status(slot)
        return 200, {
            "station": station.name,
            "slot": slot,
            "state": status.state.label,
            "fault_code": status.fault_code,
            "unit": status.unit,
        }

    def _freeze(self, args: dict[str, Any]) -> Reply:
        name = self._plc_name(args)
        frozen = args.get("frozen", True)
        if not isinstance(frozen, bool):
            raise _HttpError(400, f"'frozen' must be true or false, not {frozen!r}")
        plc = self.sim.plcs[name]
        plc.freeze_heartbeat(frozen)
        return 200, {"plc": name, "frozen": frozen, "heartbeat": plc.heartbeat}

    def _drop(self, args: dict[str, Any]) -> Reply:
        name = self._plc_name(args)
        self.sim.servers[name].drop_connections()
        return 200, {"plc": name, "dropped": True}

    def _violate(self, args: dict[str, Any]) -> Reply:
        station, slot = self._slot(args)
        kind = args.get("kind")
        if kind not in VIOLATIONS:
            raise _HttpError(400, f"'kind' must be one of {', '.join(VIOLATIONS)}, not {kind!r}")
        station.violate(kind, slot)
        status = station.status(slot)
        return 200, {
            "station": station.name,
            "slot": slot,
            "kind": kind,
            "state": int(status.state),
            "unit": status.unit,
            "ack_seq": status.ack_seq,
        }

    # --- argument checks ------------------------------------------------------------------------

    def _plc_name(self, args: dict[str, Any]) -> str:
        name = args.get("plc")
        if not isinstance(name, str):
            raise _HttpError(400, "'plc' (the PLC's name in the config) is required")
        if name not in self.sim.plcs:
            known = sorted(self.sim.plcs)
            raise _HttpError(
                404,
                f"unknown plc '{name}'{_did_you_mean(name, known)}; plcs: {', '.join(known)}",
            )
        return name

    def _slot(self, args: dict[str, Any]) -> tuple[SimStation, int]:
        name = args.get("station")
        if not isinstance(name, str):
            raise _HttpError(400, "'station' (the station's name in the config) is required")
        if name not in self.sim.config.stations:
            known = sorted(self.sim.config.stations)
            raise _HttpError(
                404,
                f"unknown station '{name}'{_did_you_mean(name, known)}; "
                f"stations: {', '.join(known)}",
            )
        station = self.sim.station(name)
        slot = _int(args, "slot", 0, 0, station.capacity - 1)
        assert slot is not None
        return station, slot


def _int(args: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = args.get(key, default)
    if value is None:
        return None
    # bool is an int in Python, but "slot": true is a mistake, not slot 1.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _HttpError(400, f"'{key}' must be an integer in {lo}..{hi}, not {value!r}")
    return value


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    try:
        request_line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
    except asyncio.LimitOverrunError:
        raise _HttpError(414, "request line too long") from None
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HttpError(400, f"not an HTTP/1.x request line: {request_line[:80]!r}")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        try:
            line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
        except asyncio.LimitOverrunError:
            raise _HttpError(431, "header line too long") from None
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep:
            raise _HttpError(400, f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    else:
        raise _HttpError(431, f"more than {MAX_HEADERS} header lines")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _HttpError(411, "chunked bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _HttpError(400, "Content-Length is not a number") from None
    if not 0 <= length <= MAX_BODY:
        raise _HttpError(413, f"body of {length} bytes; at most {MAX_BODY}")
    body = await reader.readexactly(length)
    return method, target.split("?", 1)[0], body


def _response(status: int, reply: dict[str, Any]) -> bytes:
    body = json.dumps(reply, indent=1).encode() + b"\n"
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


# --- the process ----------------------------------------------------------------------------


def describe(sim: SimLine) -> list[str]:
    """One line per PLC: name, protocol, where it listens, how many stations it runs."""
    rows = []
    for name, cfg in sim.line.plcs.items():
        n = len(sim.plcs[name].stations)
        rows.append((name, cfg.protocol, cfg.where, f"{n} station{'' if n == 1 else 's'}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]) for r in rows
    ]


async def serve(
    line: Line,
    *,
    control_port: int = 0,
    free_ports: bool = False,
    announce: Callable[[str], None] = print,
) -> None:
    """Run the line's PLCs and the control server until SIGINT or SIGTERM, then stop both.

    Announces where each PLC listens, the control URL, and last a line starting ``ready``.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    # Installed before the servers start, so a signal during start-up also ends cleanly.
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        async with (
            SimLine(line, free_ports=free_ports) as sim,
            ControlServer(sim, control_port) as control,
        ):
            for row in describe(sim):
                announce(row)
            announce(f"control  {control.url}")
            announce("ready (Ctrl-C or SIGTERM stops)")
            await stopping.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
