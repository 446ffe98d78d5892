"""A small asyncio HTTP/1.1 server for linectl's own endpoints (/metrics, the operator API, the
simulators' control interface).

Deliberately tiny: one request per connection (``Connection: close``), bodies with
Content-Length only, a bounded request size and a deadline to receive it, so it needs nothing
beyond asyncio streams and runs on the caller's event loop. That matters for /metrics: the
supervisor's ``statistics()`` must be read on the loop's thread, which rules out
prometheus_client's threaded server.

A handler is ``async def handler(request: Request) -> Response`` registered per (method, path).
Errors are answered as JSON ``{"error": "..."}``: 404 (listing the routes), 405 (naming the
allowed method), 400 for a bad request or body, and whatever status a handler's ``HttpError``
carries. ``HttpServer.respond`` needs no socket, so routing is tested without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("linectl.httpd")

MAX_BODY = 64 * 1024  # default; also bounds the request line and each header line
MAX_HEADERS = 100
REQUEST_TIMEOUT_S = 10.0  # a client that opens a connection and sends nothing is dropped
STOP_TIMEOUT_S = 5.0  # handlers still running this long after stop() are cancelled


class HttpError(Exception):
    """Raise in a handler to answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; an empty body is ``{}``. A bad body is a 400."""
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise HttpError(400, "body must be a JSON object")
        return value


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        reason = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, indent=1).encode() + b"\n")


def error_response(status: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status)


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Serves registered handlers on ``host``:``port`` (port 0: a free one, see ``port``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "http",
        max_body: int = MAX_BODY,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.name = name  # how messages name this server: "control interface", "metrics"
        self.max_body = max_body
        self.request_timeout_s = request_timeout_s
        self.routes: dict[tuple[str, str], Handler] = {}
        self._want_port = port
        self._server: asyncio.Server | None = None
        # The connection handlers asyncio starts for us, with their streams; stop() ends them.
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method.upper(), path)] = handler

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
        """Client connections being served right now."""
        return len(self._clients)

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host, self._want_port, limit=self.max_body
            )
        except OSError as exc:
            raise OSError(
                f"{self.name}: cannot listen on {self.host}:{self._want_port}: {exc}"
            ) from exc

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Closing a connection ends a handler waiting for the request with EOF, so it finishes
        # on its own. (Cancelling it instead makes Python 3.11's stream callback log the
        # CancelledError.) Only a handler stuck in its route past the deadline is cancelled.
        for writer in self._clients.values():
            writer.close()
        handlers = list(self._clients)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await server.wait_closed()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def respond(self, request: Request) -> Response:
        """The response to one request: the route's, or a JSON error."""
        method, path = request.method, request.path
        handler = self.routes.get((method, path))
        if handler is None:
            allowed = sorted(m for m, p in self.routes if p == path)
            if allowed:
                return error_response(
                    405, f"{method} {path}: method not allowed; use {', '.join(allowed)}"
                )
            routes = [f"{m} {p}" for m, p in self.routes]
            return error_response(404, f"no route {method} {path}", routes=routes)
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.status, f"{method} {path}: {exc}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._server is None:  # accepted just before stop(): do not outlive it
            writer.close()
            return
        self._clients[task] = writer
        try:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    request = await self._read_request(reader)
                response = await self.respond(request)
            except HttpError as exc:
                response = error_response(exc.status, str(exc))
            except TimeoutError:
                response = error_response(
                    408, f"no complete request within {self.request_timeout_s} s"
                )
            writer.write(response.encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nobody is left to tell
        finally:
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request:
        try:
            request_line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError(414, "request line too long") from None
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, f"not an HTTP/1.x request line: {request_line[:80]!r}")
        method, target, _version = parts
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            try:
                line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
            except asyncio.LimitOverrunError:
                raise HttpError(431, "header line too long") from None
            if not line:
                break
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, f"malformed header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        else:
            raise HttpError(431, f"more than {MAX_HEADERS} header lines")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise HttpError(411, "chunked bodies are not supported; send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if not 0 <= length <= self.max_body:
            raise HttpError(413, f"body of {length} bytes; at most {self.max_body}")
        body = await reader.readexactly(length)
        url = urlsplit(target)
        return Request(method, url.path, parse_qs(url.query), headers, body)
