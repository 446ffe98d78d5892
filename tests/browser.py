"""A running line with its line view on a free port, and a headless chromium to look at it:
for tests/test_lineview.py and bench/lineview.py."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

from linectl.api import serve_api
from linectl.bottleneck import ConstraintMonitor
from linectl.config import Line, parse_config
from linectl.lineview import LineView
from tests.linefixtures import running_line


@contextlib.asynccontextmanager
async def serving(line: Line | str, **view_args: Any) -> AsyncIterator[tuple[Any, LineView, str]]:
    """A running line with its constraint monitor and line view on an operator API (free port)."""
    if isinstance(line, str):
        line = parse_config(line)
    line = line.model_copy(update={"api": line.api.model_copy(update={"port": 0})})
    async with running_line(line, drain_timeout_s=1.0) as run, asyncio.TaskGroup() as tg:
        constraint = ConstraintMonitor(run.sup)
        view = LineView(run.sup, constraint, **view_args)
        api = await serve_api(run.sup, run.sim.line, extend=lambda a: view.mount(a.app))
        tasks = [tg.create_task(constraint.run()), tg.create_task(view.run())]
        try:
            yield run, view, api.http.url
        finally:
            view.close()
            await api.stop()
            for task in tasks:
                task.cancel()


def chromium(size: str = "1500,900") -> Any:
    """Debian's headless chromium through chromium-driver (.ci/run installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise RuntimeError("no chromium or chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={size}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


class Browser:
    """A headless chromium driven from a thread, so the line keeps running on the loop."""

    def __init__(self, size: str = "1500,900") -> None:
        self.size = size
        self.driver: Any = None

    async def __aenter__(self) -> Browser:
        self.driver = await asyncio.to_thread(chromium, self.size)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.driver.quit)

    async def js(self, script: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, script, *args)

    async def get(self, url: str) -> None:
        await asyncio.to_thread(self.driver.get, url)
