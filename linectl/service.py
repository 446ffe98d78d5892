"""Running under a service manager: READY once the line runs, a watchdog fed by the dispatch
loop's own progress, a STATUS line, STOPPING on the way out.

The watchdog is not a timer that pings whatever happens: every period it asks the dispatcher
for a pass and pings only once that pass has run. A blocked event loop runs neither this task
nor the pass, and a dead or wedged dispatch loop runs no pass, so either way the pings stop and
systemd restarts the service (``WatchdogSec=`` in deploy/linectl@.service).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from linectl.sdnotify import Notifier

log = logging.getLogger("linectl.service")

# How often the readiness probe looks for the first pass.
_PROBE_S = 0.02


class Dispatching(Protocol):
    """What the watchdog needs of a running supervisor."""

    @property
    def passes(self) -> int: ...

    def kick(self) -> None: ...

    def statistics(self): ...


def status_line(sup: Dispatching) -> str:
    stats = sup.statistics()
    down = sum(1 for s in stats.stations.values() if not s.connected)
    text = f"line {stats.line}: {stats.wip} in line, {stats.finished} finished"
    text += f", {stats.quarantined} quarantined"
    return text + (f", {down} station(s) disconnected" if down else "")


async def wait_pass(sup: Dispatching, after: int) -> None:
    """Return once the dispatcher has run a pass beyond ``after`` (it is asked for one)."""
    sup.kick()
    # Polled rather than awaited on an event, so the dispatcher needs no hook in its pass;
    # the pass asked for runs within an iteration or two of the loop.
    for _ in itertools.count():
        if sup.passes > after:
            return
        await asyncio.sleep(_PROBE_S)


async def watch(sup: Dispatching, notifier: Notifier) -> None:
    """READY=1 after the first dispatch pass, then WATCHDOG=1 every half watchdog period for as
    long as the dispatch loop keeps answering. Runs until cancelled."""
    await wait_pass(sup, 0)
    notifier.ready(status_line(sup))
    log.info("told the service manager we are ready (%s)", notifier.address)
    period = notifier.watchdog_s
    if period is None:
        while True:
            await asyncio.sleep(30.0)
            notifier.status(status_line(sup))
    interval = period / 2
    late = False
    while True:
        await asyncio.sleep(interval)
        before = sup.passes
        try:
            async with asyncio.timeout(interval):
                await wait_pass(sup, before)
        except TimeoutError:
            if not late:
                log.error(
                    "dispatch loop ran no pass in %.1f s; withholding the watchdog ping", interval
                )
            late = True
            continue
        if late:
            log.warning("dispatch loop answers again; watchdog pings resume")
            late = False
        notifier.notify(WATCHDOG=1, STATUS=status_line(sup))


@contextlib.asynccontextmanager
async def serving(sup: Dispatching, notifier: Notifier | None = None) -> AsyncIterator[None]:
    """While the body runs, speak the notify protocol if ``$NOTIFY_SOCKET`` asks for it."""
    notifier = notifier or Notifier.from_env()
    if notifier is None:
        yield
        return
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(watch(sup, notifier), name="service watchdog")
            try:
                yield
            finally:
                task.cancel()
        notifier.stopping(status_line(sup))
    finally:
        notifier.close()
