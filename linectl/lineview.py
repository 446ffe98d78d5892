"""The live line view: a web page of the line, served by the operator API.

``flow_model`` draws nothing: it turns the config's flow into the JSON tree the page lays out
(sequences, route branches, fork/join). ``LineView`` keeps the page's data: a full snapshot for
a browser that connects, then server-sent events (``GET /events``) built from ``sup.events``,
coalesced so a browser gets at most ``max_rate_hz`` updates a second, each carrying the last
state of every station that changed since the one before. Nothing runs while no browser
watches: the view subscribes to the line's events only while a client is connected.

Bounded: at most ``max_clients`` streams (a further one is answered 503), each with a queue of
``client_queue`` updates; a browser that falls that far behind is disconnected, and its
EventSource reconnects to a fresh snapshot. The page (``linectl/web/``) is plain HTML, CSS and
JavaScript shipped in the package: no CDN, works with no internet. Releasing a quarantined
unit is the API's own ``POST /release``, under its token and Origin rules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from linectl.analysis import analyze
from linectl.bottleneck import ConstraintMonitor
from linectl.config import ForkStep, Line, RouteStep
from linectl.endpoints import HttpError, json_response
from linectl.events import LineChanged, StationChanged, UnitChanged

log = logging.getLogger("linectl.lineview")

STATIC = ("lineview.js", "lineview.css")
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
QUARANTINE_SHOWN = 100  # the newest quarantined units the page lists
HEARTBEAT_S = 15.0  # an SSE comment keeps proxies from closing an idle stream
SUMMARY_S = 1.0  # throughput and constraint are refreshed this often while a client watches
HOUR_BUCKETS = 12  # the throughput sparkline: the last line hour in 5-minute bars


def flow_model(line: Line) -> dict[str, Any]:
    """The flow as a JSON tree: ``{"kind": "seq", "steps": [...]}`` of stations
    (``{"kind": "station", "name"}``), routes and forks (``{"kind": "route"|"fork", "path",
    "branches": [seq, ...]}``; a route also has its ``policy``). Paths are config.walk's."""

    def seq(steps: list[Any], path: str) -> dict[str, Any]:
        return {"kind": "seq", "steps": [step(s, f"{path}[{i}]") for i, s in enumerate(steps)]}

    def step(s: Any, path: str) -> dict[str, Any]:
        if isinstance(s, RouteStep):
            branches = [
                seq(b, f"{path}.route.branches[{j}]") for j, b in enumerate(s.route.branches)
            ]
            return {"kind": "route", "path": path, "policy": s.route.policy, "branches": branches}
        if isinstance(s, ForkStep):
            branches = [seq(b, f"{path}.fork[{j}]") for j, b in enumerate(s.fork)]
            return {"kind": "fork", "path": path, "branches": branches}
        return {"kind": "station", "name": s}

    return seq(list(line.flow), "flow")


def station_of(ev: StationChanged) -> dict[str, Any]:
    """What the page shows of a station, from its latest event."""
    return {
        "condition": ev.condition,
        "state": ev.state,
        "state_name": ev.state_name,
        "units": list(ev.units),
        "load": ev.load,
        "capacity": ev.capacity,
        "in_service": ev.in_service,
        "connected": ev.connected,
        "cycles": ev.cycles,
        "passed": ev.passed,
        "rejected": ev.rejected,
        "faults": ev.faults,
    }


def throughput(
    finish_times: tuple[float, ...], elapsed_s: float, predicted_per_h: float
) -> dict[str, Any]:
    """Finished units per line hour over the last line hour (or since start, if shorter), and
    per 5-minute bucket of it (oldest first), against the prediction. Times are line seconds
    since start, as ``statistics()`` reports them."""
    hour = 3600.0
    start = max(0.0, elapsed_s - hour)
    span = elapsed_s - start
    recent = [t for t in finish_times if t > start]
    bucket = hour / HOUR_BUCKETS
    counts = [0] * HOUR_BUCKETS
    for t in recent:
        i = HOUR_BUCKETS - 1 - int((elapsed_s - t) // bucket)
        counts[max(0, i)] += 1
    return {
        "measured_per_h": len(recent) / span * hour if span > 0 else None,
        "predicted_per_h": predicted_per_h,
        "buckets_per_h": [c / bucket * hour for c in counts],
        "bucket_line_s": bucket,
        "covered": min(1.0, elapsed_s / hour),
    }


@dataclass(frozen=True, slots=True)
class LineViewStatistics:
    clients: int  # event streams open now
    events: int  # line events consumed
    updates: int  # update messages built (each goes to every client)
    refused: int  # streams refused: max_clients reached
    dropped: int  # clients disconnected for falling behind
    busy_s: float  # CPU time spent building and queueing updates (thread time)


class _Client:
    __slots__ = ("closed", "queue", "ready")

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.ready = asyncio.Event()
        self.closed = False

    def put(self, data: bytes) -> None:
        self.queue.append(data)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class LineView:
    """The page's data for one running supervisor; ``mount(app)`` adds its routes, ``run()``
    (a task its owner runs) turns line events into updates for the connected browsers."""

    def __init__(
        self,
        sup: Any,
        constraint: ConstraintMonitor | None = None,
        *,
        max_rate_hz: float = 10.0,
        max_clients: int = 16,
        client_queue: int = 64,
    ) -> None:
        self.sup = sup
        self.constraint = constraint
        self.min_interval_s = 1.0 / max_rate_hz
        self.max_clients = max_clients
        self.client_queue = client_queue
        analysis = analyze(sup.line)
        self.predicted = {"bottleneck": analysis.bottleneck, "per_h": analysis.throughput_per_h}
        self.flow = flow_model(sup.line)
        self._clients: dict[_Client, None] = {}
        self._watched = asyncio.Event()  # set while a client is connected
        self._closing = False
        self._seq = 0
        self._events = self._updates = self._refused = self._dropped = 0
        self._busy = 0.0

    def statistics(self) -> LineViewStatistics:
        return LineViewStatistics(
            len(self._clients),
            self._events,
            self._updates,
            self._refused,
            self._dropped,
            self._busy,
        )

    # --- the page's data ----------------------------------------------------------------

    def _stations(self) -> dict[str, Any]:
        stats = self.sup.statistics()
        out = {}
        for name, st in stats.stations.items():
            slots = self.sup.stations[name].slots
            out[name] = {
                "condition": st.condition.value,
                "state": int(st.state),
                "state_name": st.state.label,
                "units": [s.occupant.unit.serial for s in slots if s.occupant is not None],
                "load": st.load,
                "capacity": st.capacity,
                "in_service": st.in_service,
                "connected": st.connected,
                "cycles": st.cycles,
                "passed": st.passed,
                "rejected": st.rejected,
                "faults": st.faults,
                "plc": st.plc,
                "cycle_s": st.cycle_s,
            }
        return out

    def _line(self) -> dict[str, Any]:
        sup = self.sup
        return {
            "released": sup.released + sup.recovered,
            "finished": sup.finished,
            "quarantined": len(sup.quarantined),
            "wip": len(sup.units),
            "max_wip": sup.max_wip,
            "paused": sup.paused,
        }

    def _quarantine(self) -> list[dict[str, Any]]:
        units = list(self.sup.quarantined.values())[-QUARANTINE_SHOWN:]
        return [{"serial": u.serial, "unit_id": u.id, "reason": u.reason} for u in units]

    def _summary(self) -> dict[str, Any]:
        stats = self.sup.statistics()
        now = None if self.constraint is None else self.constraint.current
        return {
            "constraint": {
                "station": None if now is None else now.station,
                "shifting": [] if now is None else list(now.shifting),
                "predicted": self.predicted["bottleneck"],
            },
            "throughput": throughput(stats.finish_times, stats.elapsed_s, self.predicted["per_h"]),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws."""
        return {
            "line": self.sup.line.line,
            "time_scale": self.sup.line.time_scale,
            "flow": self.flow,
            "stations": self._stations(),
            "counts": self._line(),
            "quarantine": self._quarantine(),
            **self._summary(),
        }

    def update(self, events: list[Any], *, summary: bool) -> dict[str, Any] | None:
        """One coalesced update from ``events`` (the last state of each station wins), or None
        when there is nothing to say."""
        stations: dict[str, Any] = {}
        counts = quarantine = False
        for ev in events:
            if isinstance(ev, StationChanged):
                stations[ev.station] = station_of(ev)
            elif isinstance(ev, LineChanged):
                counts = True
            elif isinstance(ev, UnitChanged) and ev.kind in ("quarantined", "quarantine_released"):
                quarantine = True
        if not (stations or counts or quarantine or summary):
            return None
        self._seq += 1
        out: dict[str, Any] = {"seq": self._seq, "stations": stations}
        if counts:
            out["counts"] = self._line()
        if quarantine:
            out["quarantine"] = self._quarantine()
        if summary:
            out.update(self._summary())
        return out

    # --- the stream -------------------------------------------------------------------

    def _broadcast(self, data: bytes) -> None:
        for client in list(self._clients):
            if len(client.queue) >= self.client_queue:
                self._dropped += 1
                log.info(
                    "line view: a browser fell %d updates behind; disconnected", len(client.queue)
                )
                self._forget(client)
                client.close()
            else:
                client.put(data)

    def _forget(self, client: _Client) -> None:
        self._clients.pop(client, None)
        if not self._clients:
            self._watched.clear()

    async def run(self) -> None:
        """Turn line events into updates while any browser watches; idle otherwise."""
        loop = asyncio.get_running_loop()
        while True:
            await self._watched.wait()
            sub = self.sup.events.subscribe(name="lineview", maxsize=10_000)
            try:
                sent = summarised = -float("inf")
                while self._clients:
                    try:
                        async with asyncio.timeout(SUMMARY_S):
                            events = [await sub.get()]
                    except TimeoutError:
                        events = []
                    # At most one update per min_interval_s: what arrives meanwhile joins it.
                    wait = sent + self.min_interval_s - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    started = time.thread_time()
                    events.extend(sub.drain())
                    self._events += len(events)
                    summary = loop.time() - summarised >= SUMMARY_S
                    message = self.update(events, summary=summary)
                    if message is not None:
                        if summary:
                            summarised = loop.time()
                        self._updates += 1
                        self._broadcast(sse("update", message))
                    sent = loop.time()
                    self._busy += time.thread_time() - started
            finally:
                sub.close()

    def close(self) -> None:
        """End every stream (before the endpoint stops)."""
        self._closing = True
        for client in list(self._clients):
            client.close()
        self._clients.clear()

    # --- routes -----------------------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/lineview.json", self._snapshot)
        app.router.add_get("/events", self._stream)

    async def _index(self, _request: web.Request) -> web.Response:
        return _file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise HttpError(404, f"no static file {name!r}; files: {', '.join(STATIC)}")
        return _file(name)

    async def _snapshot(self, _request: web.Request) -> web.Response:
        return json_response(self.snapshot())

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            raise HttpError(503, "shutting down")
        if len(self._clients) >= self.max_clients:
            self._refused += 1
            raise HttpError(503, f"at most {self.max_clients} line views at once")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        response.force_close()
        await response.prepare(request)
        client = _Client()
        self._clients[client] = None
        self._watched.set()
        try:
            await response.write(b"retry: 1000\n\n" + sse("snapshot", self.snapshot()))
            while not client.closed:
                try:
                    async with asyncio.timeout(HEARTBEAT_S):
                        await client.ready.wait()
                except TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    continue
                client.ready.clear()
                while client.queue:
                    await response.write(client.queue.popleft())
        except ConnectionError:
            pass  # the browser went away
        finally:
            self._forget(client)
        return response


def _file(name: str) -> web.Response:
    data = resources.files("linectl").joinpath("web", name).read_bytes()
    kind = TYPES["." + name.rsplit(".", 1)[-1]]
    return web.Response(
        body=data,
        headers={
            "Content-Type": f"{kind}; charset=utf-8",
            "Cache-Control": "no-cache",
            # The page loads nothing from elsewhere; a browser enforces it.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
            "X-Content-Type-Options": "nosniff",
        },
    )
