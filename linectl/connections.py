"""One HTTP endpoint's connections, counted at the asyncio protocol level (linectl.endpoints).

``Connection`` wraps aiohttp's protocol for one connection: it is counted by its endpoint,
gets a deadline for its request head, and may be closed to make room (or answered 503 when
refused). ``OUT_OF_DESCRIPTORS`` turns asyncio's accept error at the file limit, and
``ServerLog`` aiohttp's error for a malformed request, into one line a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError


class Sparse:
    """At most one log line a minute for a repeated event, saying how often it happened."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.count = 0
        self._since = 0
        self._logged_at = -math.inf

    def due(self) -> int | None:
        """Count one event; the events since the last line if one is due now, else None."""
        self.count += 1
        self._since += 1
        now = time.monotonic()
        if now - self._logged_at < self.every_s:
            return None
        since, self._since, self._logged_at = self._since, 0, now
        return since


class OutOfDescriptors(logging.Filter):
    """asyncio logs "socket.accept() out of system resource" with a traceback each time a
    listening socket hits the process's file limit (it then pauses that socket for a second).
    Keep the first of each minute as one line with the count, drop the rest."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self) -> None:
        super().__init__()
        self.sparse = Sparse()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        since = self.sparse.due()
        if since is None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = (
            f"out of file descriptors accepting an HTTP connection ({exc}); "
            f"{since} time(s) since the last such line; asyncio retries in 1 s"
        )
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


OUT_OF_DESCRIPTORS = OutOfDescriptors()


class ServerLog:
    """aiohttp's logger for one endpoint's connections. aiohttp answers a malformed request
    (a bad header line, a duplicate header, a line too long) with 400 itself, and logs each
    with a traceback at ERROR: a flood for anyone who sends many. Here such a request is
    counted and logged as one line at most once a minute; anything else (a handler's bug) is
    logged as aiohttp would."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.log = logging.getLogger("aiohttp.server")
        self.sparse = Sparse()

    def debug(self, *args: Any, **kw: Any) -> None:
        self.log.debug(*args, **kw)

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if not isinstance(exc_info, HttpProcessingError):
            self.log.exception(msg, *args, exc_info=exc_info, **kw)
            return
        self.endpoint._rejected += 1
        since = self.sparse.due()
        if since is not None:
            reason = " ".join(str(exc_info.message).split())[:120]
            logging.getLogger("linectl.endpoints").warning(
                "%s: malformed request answered 400 (%s); %d since the last such line",
                self.endpoint.name,
                reason,
                since,
            )


class Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted, with a deadline for the request head."""

    def __init__(self, endpoint: Any, inner: asyncio.Protocol | None) -> None:
        self.endpoint = endpoint
        self.inner = inner  # None: refused, answered 503
        self.transport: asyncio.Transport | None = None
        self.started = False  # a complete request head arrived
        self.doomed = False  # evicted before connection_made
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's TCPTransport has the methods of asyncio.Transport
        # but does not derive from it, and the assert failing there reset every connection.
        self.transport = transport  # type: ignore[assignment]
        if self.inner is None:
            transport.write(BUSY)
            transport.close()
            return
        if self.doomed:
            transport.abort()
            return
        self.endpoint._by_transport[transport] = self
        self.deadline = asyncio.get_running_loop().call_later(
            self.endpoint.limits.header_timeout_s, self._late
        )
        self.inner.connection_made(transport)

    def _late(self) -> None:
        self.deadline = None
        if not self.started and self.transport is not None:
            self.endpoint._timed_out += 1
            self.transport.abort()

    def close(self) -> None:
        if self.transport is None:
            self.doomed = True
        else:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.endpoint._forget(self)
        if self.inner is not None and self.transport is not None and not self.doomed:
            self.inner.connection_lost(exc)


BUSY_BODY = b'{"error": "too many connections; try again"}\n'
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(BUSY_BODY)
) + BUSY_BODY
