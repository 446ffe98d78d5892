"""The event loop linectl runs on: uvloop when installed, asyncio when asked for."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linectl import aio
from linectl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


async def _which() -> str:
    return aio.loop_name()


def test_run_uses_uvloop_when_installed_and_asyncio_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv("LINECTL_LOOP", raising=False)
    assert aio.run(_which()) == "uvloop"
    monkeypatch.setenv("LINECTL_LOOP", "asyncio")
    assert aio.run(_which()) == "asyncio"
    assert aio.run(_which(), loop="uvloop") == "uvloop"


def test_an_unknown_loop_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINECTL_LOOP", "trio")
    with pytest.raises(ConfigError, match="LINECTL_LOOP: must be one of uvloop, asyncio"):
        aio.run(_which())


def test_the_cli_names_a_bad_loop_setting_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "linectl.cli", "units", "config/demo.yaml", "--db", "sqlite:///x"],
        cwd=ROOT,
        env={**os.environ, "LINECTL_LOOP": "trio"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "LINECTL_LOOP: must be one of uvloop, asyncio, not 'trio'"
    ]


async def _one_request() -> bytes:
    from aiohttp import web

    from linectl.endpoints import Endpoint, make_app

    app = make_app()

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app.router.add_get("/", hello)
    endpoint = Endpoint(app, "127.0.0.1", 0)
    await endpoint.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{endpoint.port}\r\n\r\n".encode())
        async with asyncio.timeout(5):
            reply = await reader.read()
        writer.close()
        return reply
    finally:
        await endpoint.stop()


def test_the_http_endpoints_answer_on_uvloop() -> None:
    """uvloop's transports are not asyncio.Transport subclasses; the endpoints must not care
    (an isinstance assert once reset every connection of linectl demo on uvloop)."""
    pytest.importorskip("uvloop")
    reply = aio.run(_one_request(), loop="uvloop")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hi")


def test_the_fast_extra_is_uvloop() -> None:
    """README: ``pip install -e '.[fast]'`` adds uvloop."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert [d.split(">")[0] for d in extras["fast"]] == ["uvloop"]
