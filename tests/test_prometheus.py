"""The metrics on a real Prometheus: every dashboard query returns data for a running demo line.

A real ``prometheus`` (Debian's package; ``.ci/install-prometheus`` installs it) scrapes the
metrics endpoint of config/demo.yaml run twice as fast as usual against the bundled simulators,
on free ports, with a temporary config and storage. Missing binaries fail these tests, naming
the script to run: a skipped proof proves nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from linectl.bottleneck import ConstraintMonitor
from linectl.config import load_config
from linectl.metrics import serve_metrics
from tests.helpers import eventually
from tests.linefixtures import running_line

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "config" / "demo.yaml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "linectl-line.json"
DOCS = ROOT / "docs" / "metrics.md"
SCRAPE_S = 0.5
RATE_WINDOW = "5s"  # $__rate_interval: ten scrapes


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"'{name}' is not on PATH: run .ci/install-prometheus first")
    return path


def test_promtool_accepts_the_example_prometheus_config():
    result = subprocess.run(
        [binary("promtool"), "check", "config", str(ROOT / "grafana" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A ``prometheus`` process on 127.0.0.1 scraping one target, and its HTTP API."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.tmp = tmp
        self.target = target
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        config = self.tmp / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {int(SCRAPE_S * 1000)}ms\n"
            f"  scrape_timeout: {int(SCRAPE_S * 800)}ms\n"
            "scrape_configs:\n"
            "  - job_name: linectl\n"
            f"    static_configs: [{{targets: ['{self.target}']}}]\n"
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = await asyncio.create_subprocess_exec(
            binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
            "--log.level=warn",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(self.tmp / "prometheus.log").open("wb"),
        )

        async def ready() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                log = (self.tmp / "prometheus.log").read_text()
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {log}")
            try:
                status, _ = await self.get("/-/ready")
            except OSError:
                return False
            return status == 200

        await eventually(ready, within=15, interval=0.1, what="prometheus to be ready")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            async with asyncio.timeout(10):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def get(self, path: str) -> tuple[int, bytes]:
        def send() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as reply:
                    return reply.status, reply.read()
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, exc.read()

        return await asyncio.to_thread(send)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = await self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", f"{expr}: {reply}"
        assert reply["data"]["resultType"] == "vector", expr
        return reply["data"]["result"]

    async def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in await self.query(expr)]


def dashboard_queries(variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, query) for every target of every panel, variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for t in panel["targets"]:
            expr = t["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            assert not re.search(r"\$\w+", expr), f"unsubstituted variable in {expr}"
            out.append((panel["title"], expr))
    for example in re.findall(r"```promql\n(.*?)```", DOCS.read_text(), re.DOTALL):
        out.append(("docs/metrics.md example", " ".join(example.split())))
    return out


@pytest.mark.slow
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path):
    """Prometheus scrapes a running demo line; each panel's queries come back with numbers,
    the measured throughput is within ±50 % of the predicted one, and OEE is in (0, 1]."""
    binary("prometheus")
    line = load_config(DEMO).model_copy(update={"time_scale": 0.05})
    async with running_line(line, drain_timeout_s=1.0) as run, asyncio.TaskGroup() as tg:
        constraint = ConstraintMonitor(run.sup)
        watch = tg.create_task(constraint.run())
        metrics = await serve_metrics(run.sup, run.sim.line, port=0, constraint=constraint)
        prometheus = Prometheus(tmp_path, f"127.0.0.1:{metrics.port}")
        try:
            await prometheus.start()
            started = asyncio.get_running_loop().time()
            # A full rate window of samples taken after the first units finished: the line is
            # past filling up, and every histogram has observations inside the window.
            # (Prometheus starts scraping a few seconds after it is ready.)
            finished = f'linectl_units_finished_total{{line="demo"}}[{RATE_WINDOW}]'
            full = int(float(RATE_WINDOW.rstrip("s")) / SCRAPE_S) - 1
            settled = f"count_over_time({finished}) >= {full} and min_over_time({finished}) >= 2"

            async def steady() -> bool:
                return bool(await prometheus.values(settled))

            await eventually(steady, within=25, interval=0.25, what="a steady window of samples")
            elapsed = asyncio.get_running_loop().time() - started
            variables = {
                "$__rate_interval": RATE_WINDOW,
                "$__range": f"{math.ceil(elapsed)}s",
                "$line": "demo",
            }
            empty = []
            for title, expr in dashboard_queries(variables):
                found = [v for v in await prometheus.values(expr) if not math.isnan(v)]
                if not found:
                    empty.append(f"{title}: {expr}")
            assert not empty, "queries without data:\n" + "\n".join(empty)

            # Per line second, as the dashboard shows it: rate() is per wall second.
            rate = (
                f'sum(rate(linectl_units_finished_total{{line="demo"}}[{RATE_WINDOW}]))'
                ' * scalar(linectl_time_scale{line="demo"})'
            )
            (measured,) = await prometheus.values(rate)
            (predicted,) = await prometheus.values(
                'linectl_predicted_throughput_units_per_second{line="demo"}'
            )
            assert predicted == pytest.approx(0.1)  # test: 2 slots × 20 s → one per 10 s
            assert 0.5 * predicted <= measured <= 1.5 * predicted, (measured, predicted)
            (oee,) = await prometheus.values('linectl_line_oee_ratio{line="demo"}')
            assert 0 < oee <= 1

            # Prometheus kept the unit serials of the lead time buckets as exemplars.
            status, body = await prometheus.get(
                "/api/v1/query_exemplars?"
                + urllib.parse.urlencode(
                    {
                        "query": 'linectl_unit_lead_time_seconds_bucket{line="demo"}',
                        "start": "0",
                        "end": "4102444800",
                    }
                )
            )
            found = json.loads(body)["data"] if status == 200 else []
            serials = {e["labels"]["serial"] for s in found for e in s["exemplars"]}
            assert serials and all(re.fullmatch(r"demo-\d{6}", s) for s in serials), body
        finally:
            watch.cancel()
            await prometheus.stop()
            await metrics.stop()
