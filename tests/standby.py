"""Real `linectl run` processes sharing one PostgreSQL line, for the standby tests and
bench/kill_soak.py: start them, read what they say, signal them, check the trace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from linectl.config import parse_config
from linectl.store import TraceStore
from simulators.runner import SimLine

LINE = """
line: {name}
time_scale: {time_scale}
plcs:
  p0: {{protocol: modbus, host: 127.0.0.1, port: {p0}, poll_interval_s: 0.01, timeout_s: 0.5}}
  p1: {{protocol: opcua, url: "opc.tcp://127.0.0.1:{p1}", publishing_interval_s: 0.01,
        timeout_s: 0.5}}
stations:
  load:  {{plc: p0, address: 0, cycle_s: 3}}
  weld:  {{plc: p1, address: weld, cycle_s: 6, capacity: 2}}
  pack:  {{plc: p0, address: 40, cycle_s: 3}}
flow: [load, weld, pack]
release: {{count: {units}}}
storage: {{url: "{db}"}}
metrics: {{port: 0}}
api: {{port: 0}}
"""

FIRST_COMMAND = re.compile(r"first command ([0-9.]+) s after the previous owner's lease expired")


class Controller:
    """One `linectl run` process; its stderr lines are kept as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name=f"stderr of {name}")

    @classmethod
    async def start(cls, config: Path, *args: str, name: str = "linectl") -> Controller:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "linectl.cli",
            "run",
            str(config),
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            limit=1 << 22,  # a long log line must not end the reading
        )
        return cls(proc, name)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            while line := await self.proc.stderr.readline():
                self.lines.append(line.decode(errors="replace").rstrip())
                self._changed.set()
        finally:
            self._changed.set()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def said(self, pattern: str | re.Pattern[str], within: float = 20.0) -> re.Match[str]:
        """Wait until a line of stderr matches ``pattern``; fail if the process ends first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        try:
            async with asyncio.timeout(within):
                while True:
                    for line in self.lines:
                        if found := regex.search(line):
                            return found
                    if self._reader.done():
                        raise AssertionError(
                            f"{self.name} exited ({self.proc.returncode}) without saying "
                            f"{regex.pattern!r}:\n{self.text[-3000:]}"
                        )
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name} did not say {regex.pattern!r} within {within} s:\n{self.text[-3000:]}"
            ) from None

    async def exited(self, within: float = 30.0) -> int:
        try:
            async with asyncio.timeout(within):
                await self._reader
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name} still running after {within} s:\n{self.text[-3000:]}"
            ) from None

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def close(self) -> None:
        """Kill it if it still runs, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            if self.proc.returncode is None:
                self.proc.kill()
        await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def plant(
    tmp: Path, db: str, *, name: str, units: int, time_scale: float = 0.05
) -> AsyncIterator[tuple[SimLine, Path]]:
    """The simulators of LINE, in this process, and a config file pointing at them."""
    fields = {"name": name, "units": units, "db": db, "time_scale": time_scale}
    template = parse_config(LINE.format(p0=0, p1=0, **fields))
    async with SimLine(template, free_ports=True, heartbeat_period_s=0.05) as sim:
        p0 = sim.line.plcs["p0"].port
        p1 = int(sim.line.plcs["p1"].url.rsplit(":", 1)[1])
        config = tmp / f"{name}.yaml"
        config.write_text(LINE.format(p0=p0, p1=p1, **fields))
        yield sim, config


def cycles(sim: SimLine) -> int:
    return sum(sum(c.values()) for c in sim.completions().values())


async def trace(db: str, line: str) -> list:
    async with await TraceStore.open(db, line, create=False) as store:
        return await store.units()
