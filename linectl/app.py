"""Assemble a running controller: trace store, supervisor, metrics and operator endpoints.

``linectl run`` drives real PLCs with it; ``linectl demo`` starts the bundled simulators first.
Ctrl-C or SIGTERM stops release, drains in-flight steps, flushes the journal and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from linectl.bottleneck import ConstraintMonitor
from linectl.config import Line
from linectl.configcheck import guard
from linectl.drivers import preload
from linectl.errors import LeaseLost, StoreError
from linectl.journal import Journal
from linectl.lineview import LineView
from linectl.reload import drain_at_start, reload_config
from linectl.service import serving
from linectl.supervisor import Supervisor

log = logging.getLogger("linectl")

# How long a process that lost its lease waits for its store to close before giving up on it.
_LOST_CLOSE_S = 1.0


@contextlib.asynccontextmanager
async def _endpoints(
    sup: Supervisor,
    line: Line,
    constraint: ConstraintMonitor,
    view: LineView,
    *,
    metrics: bool,
    api: bool,
) -> AsyncIterator[list[str]]:
    """Start the metrics and operator endpoints that exist; yield where they listen."""
    from linectl.forecast_api import Forecaster

    where: list[str] = []
    forecaster = Forecaster(sup)  # POST /forecast and the forecast gauge
    async with contextlib.AsyncExitStack() as stack:
        northbound = None
        if line.northbound is not None:
            from linectl.northbound import start_northbound

            northbound = await start_northbound(sup, line)
            stack.push_async_callback(northbound.stop)
            where.extend(northbound.where)
        if metrics:
            from linectl.metrics import serve_metrics

            server = await serve_metrics(
                sup,
                line,
                line.metrics.host,
                line.metrics.port,
                northbound=northbound,
                constraint=constraint,
                store=sup.journal.store,
                forecaster=forecaster,
            )
            stack.push_async_callback(server.stop)
            where.append(f"metrics http://{line.metrics.host}:{server.port}/metrics")
        if api:
            from linectl.api import serve_api

            def extend(operator) -> None:
                forecaster.add_routes(operator)
                view.mount(operator.app)

            api_server = await serve_api(sup, line, extend=extend)
            stack.push_async_callback(api_server.stop)
            stack.callback(view.close)  # end the browsers' streams before the endpoint stops
            where.append(f"operator api http://{line.api.host}:{api_server.port}/")
            where.append(f"line view {api_server.http.url}/")
            if metrics:
                server.watch(api_server.http)
        yield where


async def run_line(
    line: Line,
    *,
    db_url: str | None = None,
    metrics: bool = True,
    api: bool = True,
    exit_when_done: bool = False,
    on_ready: Callable[[Supervisor, list[str]], None] | None = None,
    status: Callable[..., contextlib.AbstractAsyncContextManager[None]] | None = None,
    migrate: Mapping[str, str] | None = None,
    source: str = "",
    standby: bool = False,
    lease_s: float = 3.0,
) -> Supervisor:
    """Run ``line`` until a signal (or until ``release.count`` units are done).

    ``status(sup, constraint=monitor)`` is entered while it runs (the live board). It first
    takes the line's lease (docs/reliability.md): a line another process runs is refused, or
    with ``standby`` waited for. Losing the lease ends the run with LeaseLost.
    """
    from linectl.store import TraceStore

    url = db_url or line.storage_url
    # Import now what the run needs: an import blocks the loop, and with it lease renewals.
    preload(line.plcs.values())
    if metrics:
        import linectl.metrics
    if api:
        import linectl.api  # noqa: F401
    lease = None
    store = await TraceStore.open(url, line.line)
    try:
        lease = await store.acquire_lease(standby=standby, ttl_s=lease_s)
        keeper = asyncio.create_task(lease.keep(), name="lease")
        try:
            # A config that would strand units in the line is refused before anything runs.
            for unit in await guard(store, line, migrate or {}, source or f"line '{line.line}'"):
                log.warning("config change: %s", unit, extra={"unit": unit.serial})
            sup = Supervisor(
                line, journal=Journal(store), exit_when_done=exit_when_done, lease_check=lease.check
            )
            return await _supervise(
                sup, line, lease, keeper, metrics, api, on_ready, status, source
            )
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await keeper
            await lease.release()
    except Exception:
        # Whatever broke once the lease was gone (refused writes, a cancelled supervisor),
        # the one thing to say is that it was lost.
        if lease is not None and lease.lost is not None:
            raise lease.lost from None
        raise
    finally:
        if lease is not None and lease.lost is not None:
            # Its writes are refused anyway: do not wait on a database that may not answer.
            with contextlib.suppress(TimeoutError, StoreError):
                async with asyncio.timeout(_LOST_CLOSE_S):
                    await store.close()
        else:
            await store.close()


async def _supervise(sup, line, lease, keeper, metrics, api, on_ready, status, source):
    """Run ``sup`` with its endpoints until it returns; a lost lease (``keeper`` failing)
    cancels it at once, without a drain, since it may command nothing more."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sup.stop)
    try:
        constraint = ConstraintMonitor(sup)
        view = LineView(sup, constraint)
        async with (
            _endpoints(sup, line, constraint, view, metrics=metrics, api=api) as where,
            asyncio.TaskGroup() as tg,
        ):
            task = tg.create_task(sup.run(), name="supervisor")
            keeper.add_done_callback(
                lambda k: task.cancel() if not k.cancelled() and k.exception() else None
            )
            watch = tg.create_task(constraint.run(), name="constraint")
            drain = tg.create_task(drain_at_start(sup), name="drain") if line.drain else None
            if source:  # SIGHUP rereads the config file and applies what is safe
                loop.add_signal_handler(
                    signal.SIGHUP,
                    lambda: tg.create_task(reload_config(sup, Path(source)), name="reload"),
                )
            viewing = tg.create_task(view.run(), name="lineview")
            try:
                async with serving(sup):  # systemd's READY and watchdog, if it asks
                    if on_ready is not None:
                        on_ready(sup, where)
                    if status is not None:
                        async with status(sup, constraint=constraint):
                            await asyncio.shield(task)
                    else:
                        await asyncio.shield(task)
            finally:
                loop.remove_signal_handler(signal.SIGHUP)
                watch.cancel()
                if drain is not None:
                    drain.cancel()
                viewing.cancel()
                if not task.done():
                    sup.stop()
                await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if lease.lost is not None and current is not None and not current.cancelling():
            raise lease.lost from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return sup


def demo_db(line: Line) -> str:
    """The demo's embedded SQLite file, next to where it runs."""
    return f"sqlite:///{Path.cwd() / (line.line + '.sqlite3')}"
