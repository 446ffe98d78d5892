"""The one place an event loop is made: uvloop's when it is installed, asyncio's otherwise.

``pip install 'linectl[fast]'`` installs uvloop, a libuv-based loop that makes a Modbus
request about a third cheaper in CPU (measured in docs/performance.md). ``LINECTL_LOOP=asyncio``
forces the standard loop, to compare the two or to rule uvloop out when chasing a problem.

It also sets the interpreter's thread switch interval (``SWITCH_INTERVAL_S``): linectl's own
threads (the trace store's writer, the northbound OPC UA server) run Python beside the line's
loop, and while one holds the GIL the loop waits for it up to that interval, 5 ms by default:
a whole handover. ``bench/northbound.py --switch-interval`` compares (docs/northbound.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from linectl.errors import ConfigError

T = TypeVar("T")

LOOPS = ("uvloop", "asyncio")
SWITCH_INTERVAL_S = 0.0005


def loop_factory(name: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to make: ``name`` (``uvloop`` or ``asyncio``), else ``LINECTL_LOOP``,
    else uvloop if installed. None means asyncio's own."""
    name = name or os.environ.get("LINECTL_LOOP") or None
    if name not in (None, *LOOPS):
        raise ConfigError([f"LINECTL_LOOP: must be one of {', '.join(LOOPS)}, not {name!r}"])
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError(
                ["LINECTL_LOOP: uvloop is not installed; pip install 'linectl[fast]'"]
            ) from None
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop`` or ``asyncio``: which loop runs (the running one by default)."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], *, loop: str | None = None) -> T:
    """``asyncio.run(main)`` on the loop ``loop_factory(loop)`` picks."""
    try:
        factory = loop_factory(loop)
    except ConfigError:
        main.close()  # never to run: say nothing about it never being awaited
        raise
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
