"""The operator API: a small local HTTP endpoint through which ``linectl ctl`` steers a running
supervisor (drain a station or branch, pause release, release a quarantined unit).

Bound to 127.0.0.1 by default. Bound anywhere else it refuses to start without a token in
``LINECTL_API_TOKEN``, and every command must then carry ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from linectl.config import Line
from linectl.errors import ConfigError
from linectl.httpd import HttpError, HttpServer, Request, Response, json_response
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


class OperatorApi:
    def __init__(self, sup: Supervisor, line: Line, token: str | None) -> None:
        self.sup = sup
        self.token = token
        self.http = HttpServer(line.api.host, line.api.port, name="operator api")
        for method, path, handler in [
            ("GET", "/status", self.status),
            ("GET", "/quarantine", self.quarantine),
            ("POST", "/pause", self.pause),
            ("POST", "/resume", self.resume),
            ("POST", "/station", self.station),
            ("POST", "/branch", self.branch),
            ("POST", "/release", self.release),
        ]:
            self.http.route(method, path, self._guard(handler) if method == "POST" else handler)

    @property
    def port(self) -> int:
        return self.http.port

    async def stop(self) -> None:
        await self.http.stop()

    def _guard(self, handler):
        async def guarded(request: Request) -> Response:
            if self.token is not None:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), self.token.encode()):
                    raise HttpError(401, "missing or wrong operator token")
            return await handler(request)

        return guarded

    def _station(self, name: object) -> str:
        if not isinstance(name, str) or name not in self.sup.stations:
            raise HttpError(404, f"unknown station {name!r}; stations: {sorted(self.sup.stations)}")
        return name

    async def status(self, _request: Request) -> Response:
        return json_response(status_of(self.sup))

    async def quarantine(self, _request: Request) -> Response:
        return json_response(
            [
                {"serial": u.serial, "unit_id": u.id, "reason": u.reason}
                for u in self.sup.quarantined.values()
            ]
        )

    async def pause(self, _request: Request) -> Response:
        self.sup.pause(True)
        return json_response({"paused": True})

    async def resume(self, _request: Request) -> Response:
        self.sup.pause(False)
        return json_response({"paused": False})

    async def station(self, request: Request) -> Response:
        body = request.json()
        name = self._station(body.get("station"))
        in_service = bool(body.get("in_service", False))
        self.sup.set_in_service(name, in_service)
        return json_response({"station": name, "in_service": in_service})

    async def branch(self, request: Request) -> Response:
        """Every station of one route branch, named by one of its stations."""
        body = request.json()
        name = self._station(body.get("station"))
        found = self.sup.flow.route_of(name)
        if found is None:
            raise HttpError(400, f"station '{name}' is not in a route branch")
        route, b = found
        in_service = bool(body.get("in_service", False))
        stations = route.branches[b].stations()
        for st in stations:
            self.sup.set_in_service(st, in_service)
        return json_response({"stations": stations, "in_service": in_service})

    async def release(self, request: Request) -> Response:
        serial = request.json().get("serial")
        unit = next((u for u in self.sup.quarantined.values() if u.serial == serial), None)
        if unit is None:
            raise HttpError(404, f"no quarantined unit {serial!r}")
        try:
            self.sup.release_quarantined(unit.id)
        except ValueError as exc:
            raise HttpError(409, str(exc)) from None
        return json_response({"released": serial})


async def serve_api(sup: Supervisor, line: Line) -> OperatorApi:
    token = os.environ.get(TOKEN_ENV) or None
    if not _loopback(line.api.host) and token is None:
        raise ConfigError(
            [
                f"api.host: {line.api.host} is not loopback; set {TOKEN_ENV} so the operator API "
                "refuses unauthenticated commands"
            ]
        )
    api = OperatorApi(sup, line, token)
    await api.http.start()
    return api
