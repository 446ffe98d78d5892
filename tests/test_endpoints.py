"""linectl.endpoints: routing, JSON errors, and every limit and cross-site rule, on real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import textwrap
from pathlib import Path

import pytest
from aiohttp import web

from linectl.config import parse_config
from linectl.endpoints import (
    Body,
    Endpoint,
    HttpError,
    Limits,
    json_response,
    json_too_deep,
    make_app,
    read_body,
    read_json,
)
from tests.helpers import eventually

LIMITS = Limits(
    max_connections=8, header_timeout_s=0.5, body_timeout_s=0.5, max_body=1024, max_json_depth=8
)


async def raw(port: int, data: bytes, *, within: float = 5) -> tuple[int, bytes]:
    """Send ``data`` as is and return (status, body) of the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within):
            reply = await reader.read()
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def request(
    method: str, path: str, body: bytes = b"", *, host: str = "127.0.0.1", **headers: str
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def post(path: str, body: bytes, host: str = "127.0.0.1", **headers: str) -> bytes:
    return request("POST", path, body, host=host, Content_Type="application/json", **headers)


class Switch(Body):
    on: bool
    name: str = "x"


@pytest.fixture
async def server():
    calls: list[object] = []
    release = asyncio.Event()

    async def echo(request: web.Request) -> web.Response:
        args = await read_json(request)
        calls.append(args)
        if "fail" in args:
            raise HttpError(409, f"asked to fail: {args['fail']}")
        return json_response({"got": args, "query": dict(request.query)})

    async def switch(request: web.Request) -> web.Response:
        body = await read_body(request, Switch)
        calls.append(body)
        return json_response({"on": body.on})

    async def text(_request: web.Request) -> web.Response:
        return web.Response(body=b"plain\n", headers={"Content-Type": "text/plain; version=0.0.4"})

    async def slow(_request: web.Request) -> web.Response:
        calls.append("slow")
        await release.wait()
        return json_response({})

    app = make_app(LIMITS)
    app.router.add_post("/echo", echo)
    app.router.add_post("/switch", switch)
    app.router.add_get("/text", text)
    app.router.add_get("/slow", slow)
    async with Endpoint(app, "127.0.0.1", 0, name="test") as srv:
        srv.calls = calls
        srv.release = release
        yield srv
        release.set()


async def test_a_handler_gets_the_json_body_and_query_and_its_reply_is_sent(server):
    status, body = await raw(server.port, post("/echo?x=1", b'{"a": 2}'))
    assert status == 200
    assert json.loads(body) == {"got": {"a": 2}, "query": {"x": "1"}}


async def test_a_handler_can_answer_any_content_type(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request("GET", "/text"))
    reply = await reader.read()  # one request per connection: the server closes it
    writer.close()
    assert b"Content-Type: text/plain; version=0.0.4" in reply
    assert reply.endswith(b"\r\n\r\nplain\n")


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        (request("GET", "/nowhere"), 404, b"no route GET /nowhere"),
        (request("GET", "/echo"), 405, b"use POST"),
        (post("/echo", b"{nope"), 400, b"POST /echo: body is not JSON"),
        (post("/echo", b"[1]"), 400, b"body must be a JSON object"),
        (post("/echo", b'{"fail": 1}'), 409, b"asked to fail: 1"),
        (post("/echo", b"x" * 2000), 413, b"body larger than 1024 bytes"),
        (post("/echo", b"[" * 1000), 400, b"nested more than 8 levels deep"),
        (post("/echo", b'{"a":' * 100 + b"1" + b"}" * 100), 400, b"more than 8 levels"),
        (post("/switch", b'{"on": "false"}'), 400, b"'on': input should be a valid boolean"),
        (post("/switch", b'{"on": 1}'), 400, b"'on': input should be a valid boolean"),
        (post("/switch", b"{}"), 400, b"'on' is required"),
        (post("/switch", b'{"on": true, "of": 1}'), 400, b"'of': unknown key"),
        (request("POST", "/echo", b"{}", Content_Type="text/plain"), 415, b"application/json"),
        (request("POST", "/echo", b"{}"), 415, b"must be application/json"),
        (post("/echo", b"\x1f\x8b", Content_Encoding="gzip"), 415, b"compressed body"),
    ],
)
async def test_a_bad_request_gets_a_json_error_naming_the_problem(server, data, status, says):
    got, body = await raw(server.port, data)
    assert (got, says in body) == (status, True), body
    assert set(json.loads(body)) <= {"error", "routes"}  # a JSON error, never a traceback


async def test_strict_types_reach_the_handler_only_when_right(server):
    status, body = await raw(server.port, post("/switch", b'{"on": false}'))
    assert (status, json.loads(body)) == (200, {"on": False})
    assert server.calls == [Switch(on=False)]


async def test_a_request_that_is_not_http_is_answered_400_without_a_traceback(server, caplog):
    status, _ = await raw(server.port, b"nonsense\r\n\r\n")
    assert status == 400
    assert not [r for r in caplog.records if r.exc_info]


def test_json_depth_skips_brackets_inside_strings():
    assert not json_too_deep(b'{"a": "[[[[[[[[[[[[[[[[[["}', 2)
    assert not json_too_deep(b'{"a": "\\"[[[[[[[[[[["}', 2)
    assert json_too_deep(b'{"a": [[1]]}', 2)
    assert not json_too_deep(b'{"a": [1]}', 2)


# --- Host and Origin ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1", 200),
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LOCALHOST.", 200),
        ("evil.example:{port}", 421),  # a name rebound to 127.0.0.1 still says its own name
        ("10.0.0.1", 421),
    ],
)
async def test_the_host_header_must_name_the_bound_address(server, host, status):
    got, body = await raw(server.port, request("GET", "/text", host=host.format(port=server.port)))
    assert got == status, body
    if status == 421:
        assert b"is not this endpoint" in body


async def test_a_name_in_allowed_hosts_is_accepted():
    app = make_app(LIMITS)
    app.router.add_get("/", _ok)
    async with Endpoint(app, "127.0.0.1", 0, allowed_hosts=("line-7.plant",)) as srv:
        assert (await raw(srv.port, request("GET", "/", host="Line-7.Plant:80")))[0] == 200
        assert (await raw(srv.port, request("GET", "/", host="line-8.plant")))[0] == 421


async def _ok(_request: web.Request) -> web.Response:
    return json_response({})


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # not a browser
        ({"Origin": "http://127.0.0.1:{port}"}, 200),  # the page served by this endpoint
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "http://127.0.0.1:1"}, 403),  # another local service's page
        ({"Origin": "null"}, 403),  # a sandboxed frame or a file: page
        ({"Origin": "http://127.0.0.1:abc"}, 403),  # not even a URL
        ({"Sec-Fetch-Site": "cross-site"}, 403),
    ],
)
async def test_a_state_changing_request_with_a_foreign_origin_is_refused(server, headers, status):
    headers = {k: v.format(port=server.port) for k, v in headers.items()}
    data = post("/echo", b'{"a": 1}', host=f"127.0.0.1:{server.port}", **headers)
    got, body = await raw(server.port, data)
    assert got == status, body
    assert (server.calls == [{"a": 1}]) == (status == 200)


async def test_a_cross_site_form_post_never_reaches_the_handler(server):
    """What a web page can send without a CORS preflight: text/plain, a foreign Origin."""
    data = request(
        "POST", "/echo", b'{"a": 1}', Content_Type="text/plain", Origin="http://evil.example"
    )
    assert (await raw(server.port, data))[0] == 415
    assert server.calls == []


async def test_with_a_token_a_post_needs_it_and_a_get_does_not():
    app = make_app(LIMITS, token="s3cret")
    app.router.add_post("/go", _ok)
    app.router.add_get("/look", _ok)
    async with Endpoint(app) as srv:
        assert (await raw(srv.port, post("/go", b"{}")))[0] == 401
        assert (await raw(srv.port, post("/go", b"{}", Authorization="Bearer nope")))[0] == 401
        assert (await raw(srv.port, post("/go", b"{}", Authorization="Bearer s3cret")))[0] == 200
        assert (await raw(srv.port, request("GET", "/look")))[0] == 200


# --- slow clients and many connections -------------------------------------------------------


async def test_a_request_head_not_complete_in_time_is_closed(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /text HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never finish it
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert server.statistics().timed_out == 1


async def test_a_body_not_complete_in_time_is_a_408(server):
    data = post("/echo", b'{"a"').replace(b"Content-Length: 4", b"Content-Length: 40")
    status, body = await raw(server.port, data)
    assert status == 408 and b"body not received within 0.5 s" in body


@pytest.fixture
async def patient_server():
    """The test endpoint's limits, but a header deadline no idle connection reaches while 300
    of them are opened on a loaded machine: only eviction closes them."""
    async def text(_request: web.Request) -> web.Response:
        return web.Response(text="plain\n")

    app = make_app(dataclasses.replace(LIMITS, header_timeout_s=30))
    app.router.add_get("/text", text)
    async with Endpoint(app, "127.0.0.1", 0, name="test") as srv:
        yield srv


async def test_300_slow_connections_neither_starve_a_request_nor_flood_the_log(
    patient_server, caplog
):
    """Idle connections beyond the limit close the oldest idle ones: a real request still gets
    its answer, the log says so once, and the counters have the rest."""
    server = patient_server
    caplog.set_level(logging.INFO)
    idle = []
    try:
        for _ in range(300):
            idle.append(await asyncio.open_connection("127.0.0.1", server.port))
        status, _ = await raw(server.port, request("GET", "/text"))
        assert status == 200
        stats = server.statistics()
        assert stats.connections <= LIMITS.max_connections
        assert stats.evicted >= 300 - LIMITS.max_connections
    finally:
        for _, writer in idle:
            writer.close()
    await eventually(lambda: server.connection_count == 0, what="the idle connections closed")
    mine = [r for r in caplog.records if r.name == "linectl.endpoints"]
    assert 1 <= len(mine) <= 2, [r.getMessage() for r in mine]  # full; back under the limit
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_when_every_connection_is_busy_a_new_one_gets_503(server):
    busy = [
        asyncio.create_task(raw(server.port, request("GET", "/slow")))
        for _ in range(LIMITS.max_connections)
    ]
    try:
        await eventually(
            lambda: server.calls.count("slow") == LIMITS.max_connections, what="every slot busy"
        )
        status, body = await raw(server.port, request("GET", "/text"))
        assert status == 503 and b"too many connections" in body
        assert server.statistics().refused == 1
    finally:
        server.release.set()
        assert [s for s, _ in await asyncio.gather(*busy)] == [200] * LIMITS.max_connections


async def test_stop_ends_open_connections_and_frees_the_port(server):
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /text HTTP/1.1\r\n")  # and never finish the request
        await writer.drain()
        await eventually(lambda: server.connection_count == 1, what="the request being read")
        await server.stop()
        try:
            assert await reader.read() == b""
        except ConnectionResetError:
            pass
    finally:
        writer.close()
    app = make_app(LIMITS)
    async with Endpoint(app, port=port) as again:
        assert again.port == port
        assert again.url == f"http://127.0.0.1:{port}"


async def test_a_taken_port_is_one_oserror_naming_the_endpoint(server):
    with pytest.raises(OSError, match=rf"^metrics: cannot listen on 127.0.0.1:{server.port}: "):
        await Endpoint(make_app(), port=server.port, name="metrics").start()


def test_the_example_in_docs_security_md_is_a_valid_config():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    section = doc.split("\n## The HTTP endpoints\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"\n\n((?:    .*\n)+)", section)
    line = parse_config(LINE_TEXT + textwrap.dedent(block), "docs/security.md")
    assert line.metrics.allowed_hosts == ("line-7.plant",)
    assert (line.metrics.port, line.api.port) == (9464, 9465)


LINE_TEXT = """\
line: doc
plcs: {p: {protocol: modbus, host: 127.0.0.1}}
stations: {s: {plc: p, address: 0, cycle_s: 1}}
flow: [s]
"""


async def test_an_endpoint_takes_at_most_an_eighth_of_the_file_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (160, hard))
    try:
        assert Endpoint(make_app()).max_connections == 20
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert Endpoint(make_app(Limits(max_connections=8))).max_connections == 8


async def test_asyncio_accept_errors_for_lack_of_descriptors_are_one_line_a_minute(caplog):
    async with Endpoint(make_app()):  # installs the filter on asyncio's logger
        loop = asyncio.get_running_loop()
        for _ in range(50):  # what asyncio's accept loop reports, each second per socket
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(24, "Too many open files"),
                }
            )
    mine = [r for r in caplog.records if r.name == "asyncio"]
    assert len(mine) <= 1  # the first of this minute, unless an earlier test logged one
    assert not [r for r in mine if r.exc_info or "Traceback" in r.getMessage()]
    for r in mine:
        assert r.getMessage().startswith("out of file descriptors accepting an HTTP connection")


async def test_a_stream_outlives_the_head_deadline_and_stop_ends_it():
    """A server-sent event stream (the web view's /events) is one long request: the head
    deadline does not cut it, it holds no slot an idle connection could take, and stop() ends
    it within the stop deadline."""
    sent = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(1000):
                await response.write(f"data: {i}\n\n".encode())
                if i == 3:
                    sent.set()
                await asyncio.sleep(0.1)
        except ConnectionResetError:
            pass  # the client went away (aiohttp's ClientConnectionResetError is one)
        return response

    limits = Limits(header_timeout_s=0.2, stop_timeout_s=0.5, max_connections=4)
    app = make_app(limits)
    app.router.add_get("/events", events)
    srv = Endpoint(app)
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(request("GET", "/events"))
        async with asyncio.timeout(5):
            await sent.wait()
            got = b""
            while b"data: 6" not in got:  # 0.6 s in: three head deadlines later
                got += await reader.read(100)
        idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(10)]
        await eventually(
            lambda: srv.statistics().evicted + srv.statistics().timed_out == 10,
            what="the idle connections closed, never the stream",
        )
        for _, w in idle:
            w.close()
        async with asyncio.timeout(5):
            while b"data: 12" not in got:  # still streaming
                got += await reader.read(100)
            await srv.stop()
            while await reader.read(1000):
                pass
    finally:
        writer.close()
        await srv.stop()


async def test_static_files_are_served_through_the_counted_connections(tmp_path):
    """The web view serves /static/* (aiohttp's FileResponse, sendfile) under the same rules."""
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "view.js").write_text("console.log('line');\n")
    (tmp_path / "secret.txt").write_text("no\n")
    app = make_app(LIMITS)
    app.router.add_static("/static", tmp_path / "static")
    async with Endpoint(app) as srv:
        status, body = await raw(srv.port, request("GET", "/static/view.js"))
        assert (status, body) == (200, b"console.log('line');\n")
        status, _ = await raw(srv.port, request("GET", "/static/../secret.txt"))
        assert status in (403, 404)
        status, _ = await raw(srv.port, request("GET", "/static/view.js", host="evil.example"))
        assert status == 421
        await eventually(lambda: srv.connection_count == 0, what="every connection closed")


async def test_an_unterminated_string_full_of_escapes_is_answered_at_once():
    """A 64 KB body of \\" inside one open string: the depth check is one pass (a regex for
    whole strings took 37 s on it, blocking the loop), then json.loads refuses it."""
    app = make_app()
    app.router.add_post("/echo", _echo)
    async with Endpoint(app) as srv:
        body = b'{"a": "' + b'\\"' * 32000
        status, reply = await raw(srv.port, post("/echo", body), within=5)
        assert status == 400 and b"body is not JSON" in reply


async def _echo(request: web.Request) -> web.Response:
    return json_response(await read_json(request))


async def test_malformed_requests_are_counted_and_logged_once_not_a_traceback_each(caplog):
    """aiohttp answers these 400 itself; it would log a traceback for every one."""
    caplog.set_level(logging.DEBUG)
    app = make_app()
    app.router.add_get("/", _ok)
    bad = [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nA: 1\r\nContent-Type: x\r\nContent-Type: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-" + b"x" * 9000 + b": 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
    ] * 10
    async with Endpoint(app, name="test") as srv:
        for data in bad:
            status, _ = await raw(srv.port, data)
            assert status in (400, 431)
        assert srv.statistics().rejected == len(bad)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    mine = [r.getMessage() for r in caplog.records if r.name == "linectl.endpoints"]
    assert len(mine) == 1 and mine[0].startswith("test: malformed request answered 400 (")
