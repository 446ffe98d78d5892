"""The live line view: its model of the flow, its event stream, and the page in a real headless
chromium against a running line on the bundled simulators."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from linectl.config import Line, load_config
from linectl.lineview import flow_model, throughput
from tests.browser import Browser, serving
from tests.helpers import eventually

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "config" / "demo.yaml"


def demo(time_scale: float = 0.05) -> Line:
    return load_config(DEMO).model_copy(update={"time_scale": time_scale})


# --- pure parts ----------------------------------------------------------------------------


def test_the_flow_model_has_the_sequence_route_branches_and_fork_of_the_config():
    model = flow_model(demo())
    kinds = [s["kind"] for s in model["steps"]]
    assert kinds == ["station", "route", "fork", "station", "station"]
    route, fork = model["steps"][1], model["steps"][2]
    assert route["path"] == "flow[1]" and route["policy"]
    assert [[s["name"] for s in b["steps"]] for b in route["branches"]] == [
        ["press_1"],
        ["press_2"],
    ]
    assert [[s["name"] for s in b["steps"]] for b in fork["branches"]] == [["label"], ["flash"]]
    assert json.loads(json.dumps(model)) == model


def test_throughput_is_per_line_hour_over_the_last_line_hour():
    """36 units in the last 3600 line seconds are 36 per line hour, 3 in each 5-minute bar;
    units finished before that hour do not count."""
    times = tuple([100.0] * 50 + [4050 + i * 100 for i in range(36)])
    t = throughput(times, elapsed_s=7600.0, predicted_per_h=40.0)
    assert t["measured_per_h"] == pytest.approx(36)
    assert t["buckets_per_h"] == pytest.approx([36.0] * 12)
    assert t["predicted_per_h"] == 40 and t["covered"] == 1.0
    assert throughput((), 0.0, 400.0)["measured_per_h"] is None


# --- the server ------------------------------------------------------------------------------


async def read_events(url: str, seconds: float, limit: int = 10_000) -> list[tuple[str, Any]]:
    """(event, data) of the SSE stream at ``url``/events for ``seconds``."""
    out: list[tuple[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.get(url + "/events") as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for raw in reply.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        out.append((event, json.loads(line[6:])))
                        if len(out) >= limit:
                            break
    return out


async def test_the_page_and_its_files_are_served_with_a_policy_that_forbids_other_origins():
    async with serving(demo()) as (_run, _view, url), aiohttp.ClientSession() as http:
        async with http.get(url + "/") as reply:
            html = await reply.text()
            assert reply.status == 200 and "/static/lineview.js" in html
            assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
        for name in ("lineview.js", "lineview.css"):
            async with http.get(f"{url}/static/{name}") as reply:
                assert reply.status == 200 and len(await reply.read()) > 1000
        async with http.get(url + "/static/..%2Fapi.py") as reply:
            assert reply.status == 404
            assert "no static file" in (await reply.json())["error"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from elsewhere


async def test_the_stream_starts_with_a_snapshot_then_coalesces_updates_to_ten_a_second():
    """On the demo line (seven stations changing many times a second) a browser gets the whole
    line first, then at most 10 updates a second, each with the latest state of the stations
    that changed."""
    async with serving(demo(0.02)) as (run, view, url):
        await eventually(lambda: run.sup.finished >= 5, within=30, what="5 units finished")
        started = time.monotonic()
        events = await read_events(url, seconds=2.0)
        elapsed = time.monotonic() - started
        stats = view.statistics()
    # Throughput in the line's own hours, near the prediction (ramp-up included), not 10x off.
    rate = events[0][1]["throughput"]
    assert 0.2 <= rate["measured_per_h"] / rate["predicted_per_h"] <= 1.5, rate
    kind, snapshot = events[0]
    assert kind == "snapshot"
    assert set(snapshot["stations"]) == set(demo().stations)
    assert snapshot["flow"]["steps"][1]["kind"] == "route"
    updates = [data for kind, data in events[1:] if kind == "update"]
    assert updates, "no update in 2 s of a running line"
    assert len(updates) <= 10 * elapsed + 1, len(updates)
    assert stats.events > len(updates), "nothing was coalesced"
    seqs = [u["seq"] for u in updates]
    assert seqs == sorted(seqs)
    changed = {name for u in updates for name in u["stations"]}
    assert changed <= set(demo().stations) and changed
    some = next(u["stations"][n] for u in updates for n in u["stations"])
    assert {"condition", "state_name", "units", "load", "capacity"} <= set(some)


async def test_streams_are_bounded_and_nothing_listens_once_they_are_gone():
    async with serving(demo(), max_clients=1) as (run, view, url):
        async with aiohttp.ClientSession() as http, http.get(url + "/events") as first:
            assert first.status == 200
            await eventually(lambda: view.statistics().clients == 1, what="one client")
            async with http.get(url + "/events") as second:
                assert second.status == 503
                assert "at most 1 line views" in (await second.json())["error"]
            assert run.sup.events.active
        await eventually(lambda: not run.sup.events.active, what="the view to unsubscribe")
        assert view.statistics().refused == 1


# --- in a real browser -----------------------------------------------------------------------


@pytest.mark.slow
async def test_in_chromium_the_diagram_is_drawn_changes_show_within_a_second_and_release_works(
    monkeypatch,
):
    """With an operator token set, Release is refused until the operator gives the token."""
    monkeypatch.setenv("LINECTL_API_TOKEN", "s3cret-token")
    line = demo(0.05)
    async with serving(line) as (run, _view, url), Browser() as browser:
        await browser.get(url + "/")
        await eventually(lambda: browser.js("return window.lineview.ready"), within=10)
        drawn = await browser.js(
            "return [...document.querySelectorAll('g.station')].map(g => g.id)"
        )
        assert sorted(drawn) == sorted(f"st-{n}" for n in line.stations)
        assert await browser.js("return document.querySelectorAll('.join-bar').length") == 2
        assert await browser.js("return document.querySelectorAll('.route-node').length") == 2

        # A station taken out of service shows it within a second.
        shown = "return document.getElementById('st-pack').dataset.inService"
        assert await browser.js(shown) == "true"
        asked = time.monotonic()
        run.sup.set_in_service("pack", False)

        async def out_of_service() -> bool:
            return await browser.js(shown) == "false"

        await eventually(out_of_service, within=1.0, interval=0.02, what="pack out of service")
        latency = time.monotonic() - asked
        run.sup.set_in_service("pack", True)

        # Release a quarantined unit with the page's button.
        await eventually(lambda: run.sup.quarantined, within=30, what="a quarantined unit")
        serial = await eventually(
            lambda: browser.js(
                "const li = document.querySelector('#quarantine li[data-serial]');"
                "return li && li.dataset.serial"
            ),
            within=3,
        )
        button = f"document.querySelector('#quarantine li[data-serial=\"{serial}\"] button')"
        await browser.js(f"{button}.click()")

        async def asks_for_the_token() -> bool:
            return await browser.js("return !document.getElementById('token-row').hidden")

        await eventually(asks_for_the_token, within=3, what="the page to ask for the token")
        assert any(u.serial == serial for u in run.sup.quarantined.values())
        await browser.js(
            f"document.getElementById('token').value = 's3cret-token';{button}.click()"
        )
        await eventually(
            lambda: all(u.serial != serial for u in run.sup.quarantined.values()),
            within=3,
            what=f"{serial} released",
        )
        await eventually(
            lambda: browser.js(
                f"return !document.querySelector('#quarantine li[data-serial=\"{serial}\"]')"
            ),
            within=2,
            what=f"{serial} gone from the page's quarantine list",
        )

        # Paused and drained, the line comes to rest, and the page shows every station as the
        # supervisor has it (PackML state, idle, no unit).
        run.sup.pause(True)
        await eventually(lambda: not run.sup.units, within=20, what="the line to drain")

        def truth() -> dict[str, list[str]]:
            return {
                f"st-{n}": [st.state.label, "idle", "0"]
                for n, st in run.sup.statistics().stations.items()
            }

        async def page() -> dict[str, list[str]]:
            return await browser.js(
                "const out = {};"
                "for (const g of document.querySelectorAll('g.station'))"
                "  out[g.id] = [g.dataset.state, g.dataset.condition,"
                "    String(g.querySelectorAll('rect.slot.full').length)];"
                "return out;"
            )

        async def agrees() -> bool:
            return await page() == truth()

        await eventually(agrees, within=3, interval=0.05, what="the page to show the line")
        errors = [
            e
            for e in await asyncio.to_thread(browser.driver.get_log, "browser")
            if e["level"] == "SEVERE" and "/release" not in e["message"]  # the 401 above
        ]
        assert not errors, errors
    assert latency < 1.0
