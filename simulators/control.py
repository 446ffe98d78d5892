"""Run a line's simulated PLCs as a process, with a small HTTP control interface over them.

``linectl sim`` calls ``serve``: every PLC of the config on its port (``SimLine``), plus a
``ControlServer`` on 127.0.0.1 through which tests and demos in another process inject faults
and read the stations' counters. docs/simulators.md describes the routes.

The HTTP side is linectl.endpoints (aiohttp with linectl's limits: a command is a POST with a
JSON object body and ``Content-Type: application/json``); each route here is a plain function of
the request's JSON object.
"""

from __future__ import annotations

import asyncio
import difflib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from linectl.config import Line
from linectl.endpoints import Endpoint, HttpError, json_response, make_app, read_json
from simulators.runner import SimLine
from simulators.station import SimStation

VIOLATIONS = ("state", "unit", "seq")

Reply = tuple[int, dict[str, Any]]


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class ControlServer(Endpoint):
    """HTTP/1.1 JSON control of a running ``SimLine``, bound to 127.0.0.1 only."""

    def __init__(self, sim: SimLine, port: int = 0) -> None:
        super().__init__(make_app(), "127.0.0.1", port, name="control interface")
        self.sim = sim
        routes: dict[tuple[str, str], Callable[[dict[str, Any]], Reply]] = {
            ("GET", "/"): self._index,
            ("GET", "/counters"): self._counters,
            ("POST", "/fault"): self._fault,
            ("POST", "/freeze"): self._freeze,
            ("POST", "/drop"): self._drop,
            ("POST", "/violate"): self._violate,
        }
        self.routes = list(routes)
        for (method, path), route in routes.items():
            self.app.router.add_route(method, path, _json_route(route))

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

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
            raise HttpError(400, f"'frozen' must be true or false, not {frozen!r}")
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
            raise HttpError(400, f"'kind' must be one of {', '.join(VIOLATIONS)}, not {kind!r}")
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
            raise HttpError(400, "'plc' (the PLC's name in the config) is required")
        if name not in self.sim.plcs:
            known = sorted(self.sim.plcs)
            raise HttpError(
                404,
                f"unknown plc '{name}'{_did_you_mean(name, known)}; plcs: {', '.join(known)}",
            )
        return name

    def _slot(self, args: dict[str, Any]) -> tuple[SimStation, int]:
        name = args.get("station")
        if not isinstance(name, str):
            raise HttpError(400, "'station' (the station's name in the config) is required")
        if name not in self.sim.config.stations:
            known = sorted(self.sim.config.stations)
            raise HttpError(
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
        raise HttpError(400, f"'{key}' must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _json_route(
    route: Callable[[dict[str, Any]], Reply],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler of the JSON-object body that answers ``route``'s (status, JSON object)."""

    async def handler(request: web.Request) -> web.Response:
        args = await read_json(request) if request.method == "POST" else {}
        status, reply = route(args)
        return json_response(reply, status)

    return handler


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
