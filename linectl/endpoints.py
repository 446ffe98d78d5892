"""linectl's HTTP endpoints (/metrics, the operator API, the simulators' control interface) on
aiohttp, with the limits a server on a plant network needs.

``make_app`` builds an aiohttp ``web.Application`` whose middleware answers every request
within these rules; ``Endpoint`` serves it on one address. docs/security.md says what is
refused and why:

- at most ``Limits.max_connections`` open connections, and no more than an eighth of the
  process's file limit (the PLC connections and the store need the rest). When full, a new
  connection closes the oldest one that has not sent a complete request head yet; when every
  one is busy with a request, the new one gets a 503 and is closed. One log line when the
  endpoint fills up, one when it drains, and counters (``statistics()``) in between: never a
  line per connection. When the process runs out of descriptors anyway, asyncio's accept
  error (a traceback each second per socket) becomes one line a minute.
- a request head must arrive within ``header_timeout_s`` of the connect (slowloris), a body
  within ``body_timeout_s``; bodies are limited to ``max_body`` bytes and JSON to
  ``max_json_depth`` levels of nesting (checked before parsing, so no RecursionError).
- ``Host`` must name the address the endpoint is bound to (DNS rebinding): 421 otherwise.
- A state-changing request (anything but GET/HEAD/OPTIONS) must be ``application/json``, carry
  no foreign ``Origin`` and, when the app has a token, ``Authorization: Bearer <token>``, so a
  web page in a browser on the line host cannot steer the line.
- Request bodies are validated by strict pydantic models (``read_body``): ``"false"`` is not a
  boolean.

Handlers run on the event loop's thread, so /metrics reads ``statistics()`` between events.
Every connection serves one request and is closed (as a stream, /events, lives until it ends).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import resource
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from yarl import URL

from linectl.connections import OUT_OF_DESCRIPTORS, Connection, ServerLog

log = logging.getLogger("linectl.endpoints")

JSON = "application/json"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 64
    header_timeout_s: float = 5.0  # from the connect to a complete request head
    body_timeout_s: float = 10.0  # from the head to the end of the body
    max_body: int = 64 * 1024
    max_json_depth: int = 32
    # The listen backlog, which is also how many connections asyncio accepts in one go: each
    # holds a descriptor until the next loop iteration even when it is closed at once.
    backlog: int = 16
    max_line: int = 8190  # request line and each header line
    max_headers: int = 64
    stop_timeout_s: float = 2.0  # handlers still running this long after stop() are cancelled


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """What one endpoint refused since it started; read by /metrics at scrape time."""

    name: str
    connections: int  # open now
    accepted: int
    refused: int  # a new connection answered 503: every slot was busy with a request
    evicted: int  # an idle connection closed to make room for a new one
    timed_out: int  # no complete request head within header_timeout_s
    rejected: int  # requests answered 4xx by the rules above (host, origin, type, size, depth)


class HttpError(Exception):
    """Raise in a handler to answer ``status`` with ``{"error": "<METHOD> <path>: message"}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Body(BaseModel):
    """Base of request bodies: unknown keys and loose types ("false" for false) are a 400."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


M = TypeVar("M", bound=BaseModel)

LIMITS = web.AppKey("linectl_limits", Limits)
TOKEN = web.AppKey("linectl_token", str)
ENDPOINT = web.AppKey("linectl_endpoint", object)  # the Endpoint serving the app, once started


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(value, indent=1).encode() + b"\n", content_type=JSON
    )


# One pass over the tokens that matter: an escape (skipped, so \" does not end a string), a
# quote, a bracket. (A regex that matches whole strings backtracks quadratically on an
# unterminated one full of \": 37 s for 60 KB.)
_TOKEN = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether ``body`` nests arrays/objects more than ``limit`` deep (strings skipped). Checked
    before ``json.loads``, whose recursion a deep body would exhaust. Linear in the body."""
    depth = 0
    in_string = False
    for m in _TOKEN.finditer(body):
        token = m.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (an empty body is ``{}``), within the app's limits."""
    limits = request.app[LIMITS]
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            body = await request.read()  # client_max_size: a larger body is a 413
    except TimeoutError:
        raise HttpError(408, f"body not received within {limits.body_timeout_s} s") from None
    if not body.strip():
        return {}
    if json_too_deep(body, limits.max_json_depth):
        raise HttpError(400, f"JSON nested more than {limits.max_json_depth} levels deep")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpError(400, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "body must be a JSON object")
    return value


def _problem(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(body)"
    if err["type"] == "extra_forbidden":
        return f"'{where}': unknown key"
    if err["type"] == "missing":
        return f"'{where}' is required"
    return f"'{where}': {err['msg'].lower()}, not {json.dumps(err['input'])[:60]}"


async def read_body(request: web.Request, model: type[M]) -> M:
    """The body validated by ``model`` (strict: a string is never a boolean or a number)."""
    data = await read_json(request)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise HttpError(400, "; ".join(_problem(e) for e in exc.errors())) from None


def _host_part(value: str) -> tuple[str, int | None]:
    """(host, port) of a Host header or an origin's netloc; host lower case, IPv6 unbracketed."""
    host, port = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p) if p.isdigit() else -1
    return host.lower().rstrip("."), port


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    endpoint: Endpoint | None = request.app.get(ENDPOINT)  # type: ignore[assignment]
    if endpoint is not None:
        endpoint._request_started(request.transport)
    try:
        if endpoint is not None:
            endpoint.check_host(request)
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise HttpError(415, "a compressed body is not accepted; send it as is")
        if request.method not in SAFE_METHODS:
            _check_cross_site(request)
            token = request.app.get(TOKEN)
            if token is not None:
                given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), token.encode()):
                    raise HttpError(401, "missing or wrong operator token")
        response = await handler(request)
    except HttpError as exc:
        if endpoint is not None and exc.status in (400, 403, 408, 413, 415, 421):
            endpoint._rejected += 1
        response = json_response({"error": f"{request.method} {request.path}: {exc}"}, exc.status)
    except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
        if exc.status < 400:
            raise
        response = _error_of(request, exc)
        if endpoint is not None and exc.status == 413:
            endpoint._rejected += 1
    if not response.prepared:
        response.force_close()  # one request per connection
    return response


def _error_of(request: web.Request, exc: web.HTTPException) -> web.Response:
    where = f"{request.method} {request.path}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return json_response({"error": f"{where}: method not allowed; use {allowed}"}, 405)
    if isinstance(exc, web.HTTPNotFound):
        routes = sorted(
            f"{r.method} {r.resource.canonical}"
            for r in request.app.router.routes()
            if r.resource is not None and r.method != "HEAD"
        )
        return json_response({"error": f"no route {where}", "routes": routes}, 404)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[LIMITS].max_body
        return json_response({"error": f"{where}: body larger than {limit} bytes"}, 413)
    return json_response({"error": f"{where}: {exc.reason}"}, exc.status)


def _check_cross_site(request: web.Request) -> None:
    """A state-changing request must be JSON (which a cross-site form or a simple fetch cannot
    send without a CORS preflight, which we never grant) and carry no foreign Origin."""
    if request.content_type != JSON:
        given = request.headers.get("Content-Type", "none")
        raise HttpError(415, f"Content-Type must be {JSON}, not {given!r}")
    if request.headers.get("Sec-Fetch-Site", "") in ("cross-site", "same-site"):
        raise HttpError(403, "cross-site request refused")
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser: curl, linectl ctl, a script
    try:
        url = URL(origin) if origin != "null" else None
        url_port = url.explicit_port if url is not None else None
    except ValueError:  # not a URL at all: no page of ours sent it
        url = url_port = None
    host = request.headers.get("Host", "")
    if url is None or not url.host or not url.is_absolute():
        raise HttpError(403, f"cross-site request refused (Origin {origin!r})")
    same = _host_part(host) == (url.host.lower().rstrip("."), url_port) or (
        _host_part(host) == (url.host.lower().rstrip("."), None) and url.is_default_port()
    )
    if not same:
        raise HttpError(403, f"cross-site request refused (Origin {origin!r}, Host {host!r})")


def make_app(limits: Limits = Limits(), token: str | None = None) -> web.Application:
    """An application with linectl's rules in its middleware. Add routes to its ``router``
    before it is served: they get the same rules."""
    app = web.Application(middlewares=[_guard], client_max_size=limits.max_body)
    app[LIMITS] = limits
    if token is not None:
        app[TOKEN] = token
    return app


class Endpoint:
    """Serves ``app`` on ``host``:``port`` (port 0: a free one, see ``port``) within ``limits``.

    ``name`` is how messages name it ("operator api", "metrics"). ``start`` raises ``OSError``
    naming the endpoint and address when it cannot listen.
    """

    def __init__(
        self,
        app: web.Application,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "http",
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.host = host
        self.name = name
        self.limits: Limits = app[LIMITS]
        self._want_port = port
        self._names = {h.lower().rstrip(".") for h in (host, *allowed_hosts)}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[Connection, None] = {}  # in accept order, oldest first
        self._by_transport: dict[asyncio.BaseTransport, Connection] = {}
        self._bound: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._full = False
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        share = soft // 8 if soft != resource.RLIM_INFINITY else self.limits.max_connections
        self.max_connections = max(4, min(self.limits.max_connections, share))
        self._accepted = self._refused = self._evicted = self._timed_out = self._rejected = 0

    @property
    def port(self) -> int:
        if self._server is None:
            return 0
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def statistics(self) -> EndpointStatistics:
        return EndpointStatistics(
            self.name,
            len(self._conns),
            self._accepted,
            self._refused,
            self._evicted,
            self._timed_out,
            self._rejected,
        )

    async def start(self) -> None:
        self.app[ENDPOINT] = self
        limits = self.limits
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=limits.stop_timeout_s,
            keepalive_timeout=limits.header_timeout_s,
            max_line_size=limits.max_line,
            max_field_size=limits.max_line,
            max_headers=limits.max_headers,
            lingering_time=1.0,
            logger=ServerLog(self),
            auto_decompress=False,  # a gzip body of 64 KiB may inflate to 64 MiB at once
        )
        await runner.setup()
        asyncio_log = logging.getLogger("asyncio")
        if OUT_OF_DESCRIPTORS not in asyncio_log.filters:
            asyncio_log.addFilter(OUT_OF_DESCRIPTORS)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self._accept, self.host, self._want_port, backlog=limits.backlog
            )
        except OSError as exc:
            await runner.cleanup()
            # asyncio words it "error while attempting to bind on address (...): ..."
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(
                f"{self.name}: cannot listen on {self.host}:{self._want_port}: {reason}"
            ) from exc
        self._runner = runner
        self._bound = {ipaddress.ip_address(s.getsockname()[0]) for s in self._server.sockets}

    async def stop(self) -> None:
        server, self._server = self._server, None
        runner, self._runner = self._runner, None
        if server is None or runner is None:
            return
        server.close()
        for conn in list(self._conns):
            if not conn.started:
                conn.close()
        await runner.cleanup()  # closes idle connections, waits for handlers, then cancels
        for conn in list(self._conns):
            conn.close()
        await server.wait_closed()

    async def __aenter__(self) -> Endpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- the rules --------------------------------------------------------------------------

    def check_host(self, request: web.Request) -> None:
        """The Host header must name this endpoint: a page whose name was rebound to our
        address (DNS rebinding) still sends its own name."""
        header = request.headers.get("Host")
        if header is None:
            return  # HTTP/1.0 and raw clients; every browser sends Host
        host, _port = _host_part(header)
        if host in self._names or (host == "localhost" and self._loopback()):
            return
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and (
            ip in self._bound
            or any(b.is_unspecified for b in self._bound)
            or (ip.is_loopback and self._loopback())
        ):
            return
        raise HttpError(421, f"Host {header!r} is not this endpoint ({self.host})")

    def _loopback(self) -> bool:
        return bool(self._bound) and all(b.is_loopback for b in self._bound)

    # --- connections ------------------------------------------------------------------------

    def _accept(self) -> asyncio.Protocol:
        assert self._runner is not None and self._runner.server is not None
        if len(self._conns) >= self.max_connections:
            victim = next((c for c in self._conns if not c.started), None)
            self._note_full()
            if victim is None:
                self._refused += 1
                return Connection(self, None)
            self._evicted += 1
            self._conns.pop(victim)
            victim.close()
        self._accepted += 1
        conn = Connection(self, self._runner.server())
        self._conns[conn] = None
        return conn

    def _request_started(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._by_transport.get(transport) if transport is not None else None
        if conn is not None:
            conn.started = True

    def _forget(self, conn: Connection) -> None:
        self._conns.pop(conn, None)
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)
        if self._full and len(self._conns) <= self.max_connections // 2:
            self._full = False
            log.warning(
                "%s: back under its connection limit; %d evicted idle, %d refused busy, "
                "%d timed out so far",
                self.name,
                self._evicted,
                self._refused,
                self._timed_out,
            )

    def _note_full(self) -> None:
        if not self._full:
            self._full = True
            log.warning(
                "%s: %d connections open (the limit): closing the oldest idle ones, "
                "refusing new ones while every one is busy",
                self.name,
                self.max_connections,
            )


class Served:
    """Base of a server built on one ``Endpoint`` (``self.http``): where it listens, start,
    stop, and ``async with``."""

    http: Endpoint

    @property
    def host(self) -> str:
        return self.http.host

    @property
    def port(self) -> int:
        return self.http.port

    async def start(self) -> None:
        await self.http.start()

    async def stop(self) -> None:
        await self.http.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
