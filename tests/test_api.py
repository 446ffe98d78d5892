"""The operator API and `linectl ctl` steer a running supervisor over a local socket."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from linectl.api import OperatorApi, serve_api
from linectl.cli import app
from linectl.config import parse_config
from linectl.errors import ConfigError
from tests.helpers import eventually
from tests.linefixtures import running_line
from tests.test_supervisor import make_line


def call(port: int, method: str, path: str, body: dict | None = None, token: str | None = None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


LINE = make_line(
    {"r1": "cycle_s: 1", "r2": "cycle_s: 1"},
    "[{route: {branches: [[r1], [r2]]}}]",
    extra="release: {count: 1000}\napi: {port: 0}",
)


async def test_ctl_drains_a_station_pauses_release_and_reports_status(tmp_path):
    async with running_line(LINE) as run:
        api = await serve_api(run.sup, run.sim.line)
        try:
            config = tmp_path / "line.yaml"
            config.write_text(LINE.replace("api: {port: 0}", f"api: {{port: {api.port}}}"))
            await run.wait_finished(3)

            def ctl(*args: str):
                result = CliRunner().invoke(app, ["ctl", str(config), *args])
                return result.exit_code, result.output

            code, out = await asyncio.to_thread(ctl, "drain", "r1")
            assert code == 0 and '"in_service": false' in out
            assert not run.sup.stations["r1"].in_service
            code, out = await asyncio.to_thread(ctl, "pause")
            assert code == 0 and run.sup.paused
            await eventually(lambda: not run.sup.units, what="the line to empty")
            code, out = await asyncio.to_thread(ctl, "status")
            status = json.loads(out)
            assert status["paused"] is True and status["wip"] == 0
            assert status["stations"]["r1"]["in_service"] is False
            code, out = await asyncio.to_thread(ctl, "resume")
            assert code == 0 and not run.sup.paused
            code, out = await asyncio.to_thread(ctl, "drain", "nosuch")
            assert code == 1 and "unknown station 'nosuch'" in out
        finally:
            await api.stop()


async def test_a_quarantined_unit_is_listed_and_released_through_the_api():
    line = make_line(
        {"a": "cycle_s: 1", "b": "cycle_s: 1, sim: {fault_p: 1.0}"},
        "[a, b]",
        extra="release: {count: 1}\nretry: {attempts: 1, backoff_s: 0}\napi: {port: 0}",
    )
    async with running_line(line) as run:
        api = await serve_api(run.sup, run.sim.line)
        try:
            await eventually(lambda: run.sup.quarantined, what="a quarantined unit")
            status, listed = await asyncio.to_thread(call, api.port, "GET", "/quarantine")
            assert status == 200
            assert listed == [
                {
                    "serial": "t-000001",
                    "unit_id": 1,
                    "reason": "faulted 1 times at b (last fault code 1)",
                }
            ]
            await eventually(
                lambda: not any(t.slot for t in run.sup.quarantined[1].tokens),
                what="the faulted cycle to end",
            )
            # b faults every cycle: drained, it holds the released unit back where it failed
            # instead of quarantining it again before we look.
            status, _ = await asyncio.to_thread(
                call, api.port, "POST", "/station", {"station": "b", "in_service": False}
            )
            assert status == 200
            status, reply = await asyncio.to_thread(
                call, api.port, "POST", "/release", {"serial": "t-000001"}
            )
            assert (status, reply) == (200, {"released": "t-000001"})
            assert 1 in run.sup.units and not run.sup.quarantined
            status, reply = await asyncio.to_thread(
                call, api.port, "POST", "/release", {"serial": "t-000099"}
            )
            assert status == 404 and "t-000099" in reply["error"]
        finally:
            await api.stop()


async def test_with_a_token_every_command_needs_it():
    async with running_line(LINE) as run:
        api = OperatorApi(run.sup, run.sim.line, token="s3cret")
        await api.start()
        try:
            status, reply = await asyncio.to_thread(call, api.port, "POST", "/pause", {})
            assert status == 401 and "token" in reply["error"]
            assert not run.sup.paused
            status, _ = await asyncio.to_thread(call, api.port, "POST", "/pause", {}, "wrong")
            assert status == 401
            status, _ = await asyncio.to_thread(call, api.port, "POST", "/pause", {}, "s3cret")
            assert status == 200 and run.sup.paused
        finally:
            await api.stop()


async def test_off_loopback_without_a_token_the_api_refuses_to_start(monkeypatch):
    monkeypatch.delenv("LINECTL_API_TOKEN", raising=False)
    line = parse_config(LINE.replace("api: {port: 0}", "api: {host: 10.1.2.3, port: 0}"))
    with pytest.raises(ConfigError, match="LINECTL_API_TOKEN"):
        await serve_api(None, line)  # refused before anything binds


def post_raw(port: int, path: str, body: bytes, **headers: str):
    """A POST as a web page in a browser would send it, or with a loose type."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_cross_site_post_or_a_string_for_a_boolean_never_drains_a_station():
    async with running_line(LINE) as run:
        api = await serve_api(run.sup, run.sim.line)
        try:
            drain = json.dumps({"station": "r1", "in_service": False}).encode()
            for headers, status, says in [
                ({"Content-Type": "text/plain"}, 415, "application/json"),
                (
                    {"Content-Type": "application/json", "Origin": "http://evil.example"},
                    403,
                    "cross-site",
                ),
                ({"Content-Type": "application/json", "Host": "evil.example"}, 421, "Host"),
            ]:
                got, reply = await asyncio.to_thread(
                    post_raw, api.port, "/station", drain, **headers
                )
                assert (got, says in reply["error"]) == (status, True), reply
                assert run.sup.stations["r1"].in_service
            run.sup.set_in_service("r1", False)
            loose = json.dumps({"station": "r1", "in_service": "false"}).encode()
            got, reply = await asyncio.to_thread(
                post_raw, api.port, "/station", loose, **{"Content-Type": "application/json"}
            )
            assert got == 400 and "'in_service': input should be a valid boolean" in reply["error"]
            assert not run.sup.stations["r1"].in_service  # "false" did not turn it back on
        finally:
            await api.stop()


async def test_routes_added_before_start_are_served_under_the_same_rules():
    from aiohttp import web

    from linectl.endpoints import json_response

    async def hello(_request: web.Request) -> web.Response:
        return json_response({"hello": "line"})

    def extend(api: OperatorApi) -> None:
        api.app.router.add_get("/hello", hello)
        api.app.router.add_post("/poke", hello)

    async with running_line(LINE) as run:
        api = await serve_api(run.sup, run.sim.line, extend=extend)
        try:
            assert await asyncio.to_thread(call, api.port, "GET", "/hello") == (
                200,
                {"hello": "line"},
            )
            got, _ = await asyncio.to_thread(
                post_raw, api.port, "/poke", b"{}", **{"Content-Type": "text/plain"}
            )
            assert got == 415
        finally:
            await api.stop()


@pytest.mark.parametrize("which", ["metrics", "api"])
async def test_run_on_a_taken_port_says_so_in_one_line(tmp_path, which):
    taken = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        config = tmp_path / "line.yaml"
        other = "api" if which == "metrics" else "metrics"
        config.write_text(
            LINE.replace("api: {port: 0}", f"{which}: {{port: {port}}}\n{other}: {{port: 0}}")
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "linectl.cli",
            "run",
            str(config),
            "--db",
            f"sqlite:///{tmp_path / 'trace.sqlite3'}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    finally:
        taken.close()
        await taken.wait_closed()
    name = "metrics" if which == "metrics" else "operator api"
    assert proc.returncode == 1, err
    assert err.decode().strip().splitlines() == [
        f"linectl run: {name}: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
