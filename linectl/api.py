"""The operator API: a small local HTTP endpoint through which ``linectl ctl`` steers a running
supervisor (drain a station or branch, pause release, release a quarantined unit).

Bound to 127.0.0.1 by default. Bound anywhere else it refuses to start without a token in
``LINECTL_API_TOKEN``, and every command must then carry ``Authorization: Bearer <token>``.
linectl.endpoints adds the limits and the cross-site rules (docs/security.md).

Other modules add routes (the web line view: ``GET /``, ``/static/*``, ``/events``) to
``OperatorApi.app``, an aiohttp ``web.Application``, between construction and ``start()``::

    api = OperatorApi(sup, line, token)
    api.app.router.add_get("/", index)
    await api.start()

``serve_api(sup, line, extend=add_view_routes)`` does the same: ``extend(api)`` is called
before the endpoint starts. Added routes run under the same rules (Host, limits, and for
anything but GET/HEAD/OPTIONS: JSON only, no foreign Origin, the token). A streaming handler
(server-sent events) catches ``ConnectionResetError`` when its client goes away (else aiohttp
logs a traceback), and ends on ``app.on_shutdown``; one still running 2 s after ``stop()`` is
cancelled. tests/test_endpoints.py has one such stream.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable

from aiohttp import web

from linectl.config import Line
from linectl.endpoints import (
    Body,
    Endpoint,
    HttpError,
    Served,
    json_response,
    make_app,
    read_body,
)
from linectl.errors import ConfigError
from linectl.supervisor import Supervisor

TOKEN_ENV = "LINECTL_API_TOKEN"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def status_of(sup: Supervisor) -> dict:
    stats = sup.statistics()
    return {
        "line": stats.line,
        "paused": stats.paused,
        "released": stats.released,
        "finished": stats.finished,
        "rejected": stats.rejected,
        "quarantined": stats.quarantined,
        "wip": stats.wip,
        "max_wip": sup.max_wip,
        "stations": {
            name: {
                "state": st.state.label,
                "condition": st.condition.value,
                "in_service": st.in_service,
                "connected": st.connected,
                "load": st.load,
                "capacity": st.capacity,
                "cycles": st.cycles,
                "faults": st.faults,
                "utilization": round(st.utilization, 4),
            }
            for name, st in stats.stations.items()
        },
    }


class StationBody(Body):
    station: str
    in_service: bool


class ReleaseBody(Body):
    serial: str


class NoBody(Body):
    pass


class OperatorApi(Served):
    """The operator API's routes on ``app``, served by ``start()`` on ``line.api``."""

    def __init__(self, sup: Supervisor, line: Line, token: str | None) -> None:
        self.sup = sup
        self.token = token
        self.app: web.Application = make_app(token=token)
        self.app.router.add_routes(
            [
                web.get("/status", self.status),
                web.get("/quarantine", self.quarantine),
                web.post("/pause", self.pause),
                web.post("/resume", self.resume),
                web.post("/station", self.station),
                web.post("/branch", self.branch),
                web.post("/release", self.release),
            ]
        )
        self.http = Endpoint(
            self.app,
            line.api.host,
            line.api.port,
            name="operator api",
            allowed_hosts=line.api.allowed_hosts,
        )

    def _station(self, name: str) -> str:
        if name not in self.sup.stations:
            raise HttpError(404, f"unknown station {name!r}; stations: {sorted(self.sup.stations)}")
        return name

    async def status(self, _request: web.Request) -> web.Response:
        return json_response(status_of(self.sup))

    async def quarantine(self, _request: web.Request) -> web.Response:
        return json_response(
            [
                {"serial": u.serial, "unit_id": u.id, "reason": u.reason}
                for u in self.sup.quarantined.values()
            ]
        )

    async def pause(self, request: web.Request) -> web.Response:
        await read_body(request, NoBody)
        self.sup.pause(True, _who(request))
        await self.sup.wait_durable()
        return json_response({"paused": True})

    async def resume(self, request: web.Request) -> web.Response:
        await read_body(request, NoBody)
        self.sup.pause(False, _who(request))
        await self.sup.wait_durable()
        return json_response({"paused": False})

    async def station(self, request: web.Request) -> web.Response:
        body = await read_body(request, StationBody)
        name = self._station(body.station)
        self.sup.set_in_service(name, body.in_service, _who(request))
        await self.sup.wait_durable()
        return json_response({"station": name, "in_service": body.in_service})

    async def branch(self, request: web.Request) -> web.Response:
        """Every station of one route branch, named by one of its stations."""
        body = await read_body(request, StationBody)
        name = self._station(body.station)
        found = self.sup.flow.route_of(name)
        if found is None:
            raise HttpError(400, f"station '{name}' is not in a route branch")
        route, b = found
        stations = route.branches[b].stations()
        for st in stations:
            self.sup.set_in_service(st, body.in_service, _who(request))
        await self.sup.wait_durable()
        return json_response({"stations": stations, "in_service": body.in_service})

    async def release(self, request: web.Request) -> web.Response:
        serial = (await read_body(request, ReleaseBody)).serial
        unit = next((u for u in self.sup.quarantined.values() if u.serial == serial), None)
        if unit is None:
            raise HttpError(404, f"no quarantined unit {serial!r}")
        try:
            self.sup.release_quarantined(unit.id, _who(request))
        except ValueError as exc:
            raise HttpError(409, str(exc)) from None
        await self.sup.wait_durable()
        return json_response({"released": serial})


def _who(request: web.Request) -> str:
    """How the journal names who acted: the API and the peer's address."""
    return f"api {request.remote or '?'}"


async def serve_api(
    sup: Supervisor, line: Line, extend: Callable[[OperatorApi], None] | None = None
) -> OperatorApi:
    """Start the operator API on ``line.api``; ``extend(api)`` may add routes to ``api.app``
    first."""
    token = os.environ.get(TOKEN_ENV) or None
    if not _loopback(line.api.host) and token is None:
        raise ConfigError(
            [
                f"api.host: {line.api.host} is not loopback; set {TOKEN_ENV} so the operator API "
                "refuses unauthenticated commands"
            ]
        )
    api = OperatorApi(sup, line, token)
    if extend is not None:
        extend(api)
    await api.start()
    return api
