"""Figures of the live line view (issue 16), in a real headless chromium on loopback:

1. page load: navigation to the diagram drawn from its first snapshot, 200 stations;
2. coalescing: station events the line publishes per second against updates a browser gets,
   on config/demo.yaml at its own time scale (0.1);
3. cost to the controller at that event rate: the process's CPU with a browser watching
   against without (alternating windows), and the view's own thread time per second.

    .venv/bin/python bench/lineview.py            # all three, about two minutes
    .venv/bin/python bench/lineview.py --screenshot docs/img/lineview.png

Needs Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from wide_plant import wide  # noqa: E402

from linectl.config import load_config  # noqa: E402
from linectl.events import StationChanged  # noqa: E402
from tests.browser import Browser, serving  # noqa: E402
from tests.helpers import eventually  # noqa: E402

DEMO = ROOT / "config" / "demo.yaml"


async def ready(browser: Browser, within: float = 20.0) -> None:
    await eventually(lambda: browser.js("return window.lineview.ready"), within=within)


async def page_load(stations: int = 200, loads: int = 5) -> None:
    async with serving(wide(stations)) as (run, _view, url), Browser() as browser:
        run.sup.on_event = None
        await run.wait_finished(1, within=30)
        times = []
        for _ in range(loads):
            await browser.get("about:blank")
            await browser.get(url + "/")
            await ready(browser)
            times.append(await browser.js("return window.lineview.loadedAt") / 1000)
        drawn = await browser.js("return document.querySelectorAll('g.station').length")
        size = await browser.js("return JSON.stringify(window.lineview.model).length")
    print(
        f"page load, {drawn} stations drawn (snapshot {size / 1024:.0f} KiB): "
        f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
        f"over {loads} loads (navigation start to the diagram drawn)"
    )


async def demo_rate(seconds: float = 10.0, rounds: int = 3) -> None:
    line = load_config(DEMO)  # time_scale 0.1: the demo's own event rate
    async with serving(line) as (run, view, url):
        run.sup.on_event = None  # the invariant checks are the tests' cost, not the view's
        await run.wait_finished(5, within=60)
        loop = asyncio.get_running_loop()

        async def window(watched: Browser | None) -> tuple[float, float, int, int]:
            sub = run.sup.events.subscribe(name="bench", maxsize=100_000)
            try:
                before = view.statistics()
                updates0 = 0 if watched is None else await watched.js("return lineview.updates")
                cpu, wall = time.process_time(), loop.time()
                await asyncio.sleep(seconds)
                cpu, wall = time.process_time() - cpu, loop.time() - wall
                changes = sum(1 for e in sub.drain() if isinstance(e, StationChanged))
            finally:
                sub.close()
            busy = view.statistics().busy_s - before.busy_s
            got = 0 if watched is None else await watched.js("return lineview.updates") - updates0
            return cpu / wall, busy / wall, changes, got

        idle, watched, busy, rates = [], [], [], []
        async with Browser() as browser:
            for _ in range(rounds):
                await browser.get("about:blank")
                await eventually(lambda: view.statistics().clients == 0, what="no client")
                idle.append((await window(None))[0])
                await browser.get(url + "/")
                await ready(browser)
                cpu, own, changes, got = await window(browser)
                watched.append(cpu)
                busy.append(own)
                rates.append((changes / seconds, got / seconds))
    per_s = statistics.mean(c for c, _ in rates)
    got_s = statistics.mean(g for _, g in rates)
    print(
        f"coalescing on the demo line: {per_s:.0f} station events/s published, a browser got "
        f"{got_s:.1f} updates/s (limit 10/s), {per_s / max(got_s, 1e-9):.1f} events per update"
    )
    extra = statistics.mean(watched) - statistics.mean(idle)
    print(
        f"controller CPU at the demo's event rate: {statistics.mean(idle):.1%} of a core "
        f"unwatched, {statistics.mean(watched):.1%} with a browser watching (difference "
        f"{extra:+.1%}; {rounds} x {seconds:g} s each, alternating); the view's own thread "
        f"time {statistics.mean(busy):.2%} of a core"
    )


async def screenshot(path: Path, seconds: float = 60.0) -> None:
    """The demo line at its own pace, after ``seconds`` so the quarantine and the throughput
    have something to show."""
    async with serving(load_config(DEMO)) as (run, _view, url), Browser("1440,760") as browser:
        run.sup.on_event = None
        await asyncio.sleep(seconds)
        await browser.get(url + "/")
        await ready(browser)
        await eventually(lambda: browser.js("return lineview.updates > 10"), within=10)
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(browser.driver.save_screenshot, str(path))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screenshot", type=Path, help="write a screenshot of the demo here")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement window")
    args = parser.parse_args()
    if args.screenshot:
        asyncio.run(screenshot(args.screenshot))
        return
    asyncio.run(page_load())
    asyncio.run(demo_rate(args.seconds))


if __name__ == "__main__":
    main()
