"""linectl.httpd: routing, JSON errors, limits and shutdown, on a real socket."""

from __future__ import annotations

import asyncio

import pytest

from linectl.httpd import HttpError, HttpServer, Request, Response, json_response
from tests.helpers import eventually


async def raw(port: int, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` as is and return (status, body) of the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            reply = await reader.read()
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
async def server():
    async def echo(request: Request) -> Response:
        args = request.json()
        if "fail" in args:
            raise HttpError(409, f"asked to fail: {args['fail']}")
        return json_response({"got": args, "query": request.query})

    async def text(_request: Request) -> Response:
        return Response(200, b"plain\n", "text/plain; version=0.0.4")

    srv = HttpServer(max_body=1024, request_timeout_s=0.5)
    srv.route("POST", "/echo", echo)
    srv.route("GET", "/text", text)
    async with srv:
        yield srv


def post(path: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def test_a_handler_gets_the_json_body_and_query_and_its_reply_is_sent(server):
    status, body = await raw(server.port, post("/echo?x=1", b'{"a": 2}'))
    assert status == 200
    assert b'"a": 2' in body and b'"x"' in body


async def test_a_handler_can_answer_any_content_type(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /text HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = await reader.read()
    writer.close()
    assert b"Content-Type: text/plain; version=0.0.4" in reply
    assert reply.endswith(b"\r\n\r\nplain\n")


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404, b"no route GET /nowhere"),
        (b"GET /echo HTTP/1.1\r\n\r\n", 405, b"use POST"),
        (post("/echo", b"{nope"), 400, b"POST /echo: body is not JSON"),
        (post("/echo", b"[1]"), 400, b"body must be a JSON object"),
        (post("/echo", b'{"fail": 1}'), 409, b"asked to fail: 1"),
        (post("/echo", b"x" * 2000), 413, b"at most 1024"),
        (b"nonsense\r\n\r\n", 400, b"not an HTTP/1.x request line"),
        (b"GET /" + b"x" * 2000 + b" HTTP/1.1\r\n\r\n", 414, b"request line too long"),
        (b"GET /text HTTP/1.1\r\n", 408, b"no complete request within 0.5 s"),
    ],
)
async def test_a_bad_request_gets_a_json_error_naming_the_problem(server, data, status, says):
    got, body = await raw(server.port, data)
    assert (got, says in body) == (status, True), body


async def test_the_server_binds_the_given_host_only():
    async with HttpServer("127.0.0.1") as srv:
        assert srv.port != 0
        assert srv.url == f"http://127.0.0.1:{srv.port}"
        assert srv._server.sockets[0].getsockname()[0] == "127.0.0.1"


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
    async with HttpServer(port=port) as again:
        assert again.port == port
