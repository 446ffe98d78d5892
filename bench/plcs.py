"""Many single-station Modbus PLCs, one connection each, polled every 100 ms.

    .venv/bin/python bench/plcs.py                       # 500, 1,000 and 2,000 PLCs
    .venv/bin/python bench/plcs.py --plcs 2000 --seconds 5

The controller is a real ``Supervisor`` in this process (release paused, so the line only
polls: the cost of watching a plant that is not moving, which is what most polls are). The
PLCs are lean Modbus TCP responders in ``SIM_PROCESSES`` spawned processes, so the simulator
is not the limit: each serves its stations' real register blocks (linectl.contract's encoders,
a heartbeat ticking every 100 ms) with a plain asyncio protocol, and stamps the arrival of
every read on the system-wide monotonic clock.

- **CPU share**: this process's CPU time / wall time over the measured window (1.0 = a core).
- **poll lateness**: how late each read reaches its PLC against that PLC's ideal schedule.
  Per PLC, each arrival is placed on the grid ``t0 + k * poll`` (k rounded); its lateness is
  its offset from the grid minus the smallest offset of that PLC (its most punctual poll).
  A poll more than half an interval late folds onto the next grid point: **polls/s** (as a
  share of the schedule) shows those skipped.
- **CPU per poll**: the controller's CPU divided by the reads the PLCs answered.
- **answer**: the mean time from a request to its answer, as the poller saw it. A poller
  that waits for each answer before its next poll (linectl) misses polls once this nears
  the interval: then the PLCs, or the cores they share, are the limit, not the poller.
- **peak RSS**: this process's VmHWM during the row.

The anchors run against the same PLCs in the same run: ``pymodbus`` (one AsyncModbusTcpClient
per PLC, a task per PLC awaiting each read: the plainest use of the library linectl's driver
is built on) and ``raw`` (a plain asyncio protocol per PLC writing the request bytes and
parsing the answer, timers from ``call_at``: the floor for asyncio in Python).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import struct
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linectl.contract import SlotStatus, command_words, encode_header, encode_slot_status

POLL_S = 0.1
SIM_PROCESSES = 4
WARMUP_S = 1.0
ANCHOR_PLCS = 200
WORDS = 24  # one single-slot station block (linectl.contract.block_words(1))


# --- the PLC processes ----------------------------------------------------------------------


class _Plc(asyncio.Protocol):
    """One PLC's connection: answers Read Holding Registers (function 3) from its block."""

    def __init__(self, sim: _Sim, index: int) -> None:
        self.sim = sim
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        while len(buf) >= 7:
            tid, _proto, length, unit = struct.unpack_from(">HHHB", buf)
            if len(buf) < 6 + length:
                break
            pdu, buf = buf[7 : 6 + length], buf[6 + length :]
            self.transport.write(self.sim.answer(self.index, tid, unit, pdu))  # type: ignore[union-attr]
        self.buffer = buf


class _Sim:
    def __init__(self) -> None:
        self.heartbeat = 0
        self.arrivals: list[list[float]] = []
        self.recording = False
        tail = command_words(0, 0, 0) + encode_slot_status(SlotStatus())
        self.tail = struct.pack(f">{len(tail)}H", *tail)

    def answer(self, index: int, tid: int, unit: int, pdu: bytes) -> bytes:
        if pdu[0] != 3:
            return struct.pack(">HHHBBB", tid, 0, 3, unit, pdu[0] | 0x80, 1)
        if self.recording:
            self.arrivals[index].append(time.monotonic())
        start, count = struct.unpack_from(">HH", pdu, 1)
        words = struct.pack(">8H", *encode_header(self.heartbeat, 0, 1)) + self.tail
        body = (words + bytes(2 * count))[: 2 * count] if start == 0 else bytes(2 * count)
        return struct.pack(">HHHBBB", tid, 0, 3 + 2 * count, unit, 3, 2 * count) + body


def sim_process(conn: Connection, plcs: int) -> None:
    asyncio.run(_sim_main(conn, plcs))


async def _sim_main(conn: Connection, plcs: int) -> None:
    loop = asyncio.get_running_loop()
    sim = _Sim()
    sim.arrivals = [[] for _ in range(plcs)]
    servers = [
        await loop.create_server(lambda i=i: _Plc(sim, i), "127.0.0.1", 0, backlog=64)
        for i in range(plcs)
    ]
    conn.send([s.sockets[0].getsockname()[1] for s in servers])

    async def beat() -> None:
        while True:
            await asyncio.sleep(POLL_S)
            sim.heartbeat = (sim.heartbeat + 1) & 0xFFFF

    beating = asyncio.create_task(beat())
    try:
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            if message == "record":
                for a in sim.arrivals:
                    a.clear()
                sim.recording = True
            elif message == "report":
                sim.recording = False
                conn.send(sim.arrivals)
            else:  # "stop"
                break
    finally:
        beating.cancel()
        for s in servers:
            s.close()


@contextlib.contextmanager
def simulators(plcs: int, processes: int = SIM_PROCESSES):
    """Start ``plcs`` PLCs spread over ``processes`` processes; yield (ports, pipes)."""
    ctx = mp.get_context("spawn")
    shares = [plcs // processes + (i < plcs % processes) for i in range(processes)]
    pipes, children = [], []
    try:
        for share in shares:
            here, there = ctx.Pipe()
            child = ctx.Process(target=sim_process, args=(there, share), daemon=True)
            child.start()
            pipes.append(here)
            children.append(child)
        ports = []
        for pipe in pipes:
            if not pipe.poll(60):
                raise TimeoutError("a PLC process did not start within 60 s")
            ports += pipe.recv()
        yield ports, pipes
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join()


def _send_all(pipes: list[Connection], message: str) -> None:
    for pipe in pipes:
        pipe.send(message)


async def _arrivals(pipes: list[Connection]) -> list[list[float]]:
    loop = asyncio.get_running_loop()
    _send_all(pipes, "report")
    out: list[list[float]] = []
    for pipe in pipes:
        out += await loop.run_in_executor(None, pipe.recv)
    return out


def lateness(arrivals: list[list[float]], poll: float) -> tuple[list[float], int]:
    """Every poll's lateness against its PLC's own grid (see the module docstring), and the
    number of polls."""
    out: list[float] = []
    for times in arrivals:
        if len(times) < 2:
            continue
        t0 = times[0]
        offsets = [t - t0 - round((t - t0) / poll) * poll for t in times]
        best = min(offsets)
        out += [o - best for o in offsets]
    return out, sum(len(t) for t in arrivals)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for row in Path("/proc/self/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) / 1024
    return math.nan


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# --- the pollers ----------------------------------------------------------------------------


def line_yaml(ports: list[int], poll: float) -> str:
    rows = ["line: plcs", "time_scale: 1", "plcs:"]
    rows += [
        f"  p{i}: {{protocol: modbus, host: 127.0.0.1, port: {port}, poll_interval_s: {poll}}}"
        for i, port in enumerate(ports)
    ]
    rows.append("stations:")
    rows += [f"  s{i}: {{plc: p{i}, address: 0, cycle_s: 1}}" for i in range(len(ports))]
    rows.append("flow: [s0]")
    return "\n".join(rows) + "\n"


@contextlib.asynccontextmanager
async def linectl_poller(ports: list[int], poll: float):
    """A real supervisor over the PLCs, release paused: it only polls."""
    from linectl.config import parse_config
    from linectl.supervisor import Supervisor

    sup = Supervisor(parse_config(line_yaml(ports, poll)))
    sup.pause(True)
    task = asyncio.create_task(sup.run(), name="supervisor")

    def answered() -> tuple[int, float]:
        stats = sup.driver_statistics()
        return sum(d.requests for d in stats), sum(d.request_seconds_total for d in stats)

    try:
        async with asyncio.timeout(60):
            while not all(st.connected for st in sup.stations.values()):
                if task.done():
                    task.result()
                await asyncio.sleep(0.1)
        yield answered
    finally:
        sup.stop()
        async with asyncio.timeout(30):
            await task


@contextlib.asynccontextmanager
async def pymodbus_poller(ports: list[int], poll: float):
    """One AsyncModbusTcpClient per PLC, one task each: read, sleep to the next tick."""
    from pymodbus.client import AsyncModbusTcpClient
    from pymodbus.exceptions import ModbusException

    clients = [
        AsyncModbusTcpClient("127.0.0.1", port=p, reconnect_delay=0, retries=0, timeout=1)
        for p in ports
    ]

    async def poll_forever(client: Any, phase: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + phase
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += poll
            try:
                await client.read_holding_registers(0, count=WORDS, device_id=1)
            except ModbusException:
                pass  # pymodbus turns a cancellation into ModbusIOException
            # ... or, awaiting wait_for on Python 3.11, drops a cancellation that arrives with
            # the answer (cpython gh-86296): the row then hung. Stop on either.
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise asyncio.CancelledError

    try:
        async with asyncio.TaskGroup() as tg:
            for c in clients:
                await c.connect()
            tasks = [
                tg.create_task(poll_forever(c, poll * i / len(clients)))
                for i, c in enumerate(clients)
            ]
            try:
                yield None
            finally:
                for t in tasks:
                    t.cancel()
    finally:
        for c in clients:
            c.close()


class _RawClient(asyncio.Protocol):
    """A plain asyncio Modbus poller: one request in flight, the next on a ``call_at`` timer."""

    REQUEST = struct.Struct(">HHHBBHH")

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self.tid = 0
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.answers = 0
        self.sent_at = 0.0
        self.waited = 0.0  # seconds from request to answer, summed
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, at: float) -> None:
        self.next_at = at
        self.timer = asyncio.get_running_loop().call_at(at, self.send)

    def send(self) -> None:
        self.tid = (self.tid + 1) & 0xFFFF
        self.sent_at = time.monotonic()
        self.transport.write(self.REQUEST.pack(self.tid, 0, 6, 1, 3, 0, WORDS))  # type: ignore[union-attr]
        self.next_at += self.poll
        self.timer = asyncio.get_running_loop().call_at(self.next_at, self.send)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        while len(buf) >= 9:
            tid, _, length, _unit, fc, size = struct.unpack_from(">HHHBBB", buf)
            if len(buf) < 6 + length:
                break
            if fc == 3 and tid == self.tid:
                struct.unpack_from(f">{size // 2}H", buf, 9)  # decode, as a poller must
                self.answers += 1
                self.waited += time.monotonic() - self.sent_at
            buf = buf[6 + length :]
        self.buffer = buf


@contextlib.asynccontextmanager
async def raw_poller(ports: list[int], poll: float):
    loop = asyncio.get_running_loop()
    made = [await loop.create_connection(lambda: _RawClient(poll), "127.0.0.1", p) for p in ports]
    now = loop.time()
    for i, (_, proto) in enumerate(made):
        proto.start(now + poll * i / len(made))

    def answered() -> tuple[int, float]:
        return sum(p.answers for _, p in made), sum(p.waited for _, p in made)

    try:
        yield answered
    finally:
        for transport, proto in made:
            if proto.timer is not None:
                proto.timer.cancel()
            transport.close()


POLLERS = {"linectl": linectl_poller, "pymodbus": pymodbus_poller, "raw": raw_poller}


# --- one row ----------------------------------------------------------------------------------


@dataclass
class Result:
    poller: str
    plcs: int
    seconds: float
    cpu_share: float
    polls: int
    late_p50_ms: float
    late_p99_ms: float
    peak_rss_mb: float
    answer_ms: float = math.nan  # mean time from a request to its answer, as the poller saw it

    @property
    def cpu_us_per_poll(self) -> float:
        return self.cpu_share * self.seconds / self.polls * 1e6 if self.polls else math.nan

    @property
    def schedule_share(self) -> float:
        return self.polls / (self.plcs * self.seconds / POLL_S)


async def _measure(poller: str, ports: list[int], pipes: list[Connection], seconds: float):
    async with asyncio.timeout(seconds + 120):  # a row is bounded, whatever hangs
        return await _measured(poller, ports, pipes, seconds)


async def _measured(poller: str, ports: list[int], pipes: list[Connection], seconds: float):
    async with POLLERS[poller](ports, POLL_S) as answered:
        await asyncio.sleep(WARMUP_S)
        reset_peak_rss()
        _send_all(pipes, "record")
        a0 = answered() if answered else (0, 0.0)
        t0, c0 = time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        a1 = answered() if answered else (0, 0.0)
        arrivals = await _arrivals(pipes)
        rss = peak_rss_mb()
    late, polls = lateness(arrivals, POLL_S)
    answers = a1[0] - a0[0]
    return Result(
        poller,
        len(ports),
        wall,
        cpu / wall,
        polls,
        percentile(late, 0.5) * 1000,
        percentile(late, 0.99) * 1000,
        rss,
        (a1[1] - a0[1]) / answers * 1000 if answers else math.nan,
    )


def measure(poller: str, plcs: int, seconds: float, *, loop: str | None = None) -> Result:
    """One row: ``plcs`` PLCs in fresh simulator processes, polled by ``poller`` here."""
    from linectl import aio

    with simulators(plcs) as (ports, pipes):
        return aio.run(_measure(poller, ports, pipes, seconds), loop=loop)


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plcs", type=int, action="append", help="default: 500 1000 2000")
    parser.add_argument("--poller", choices=sorted(POLLERS), action="append")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    print(
        f"{'poller':9} {'PLCs':>5} {'CPU':>5} {'us/poll':>8} {'late p50':>9} {'p99':>7} "
        f"{'polls':>6} {'answer':>7} {'RSS MB':>7}  load"
    )
    for plcs in args.plcs or [500, 1000, 2000]:
        for poller in args.poller or ["linectl"]:
            r = measure(poller, plcs, args.seconds, loop=args.loop)
            print(
                f"{poller:9} {plcs:>5} {r.cpu_share:>5.0%} {r.cpu_us_per_poll:>8.0f} "
                f"{r.late_p50_ms:>7.1f}ms {r.late_p99_ms:>5.1f}ms {r.schedule_share:>6.0%} "
                f"{_ms(r.answer_ms):>7} {r.peak_rss_mb:>7.0f}  {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()


# --- rows for bench/run.py ------------------------------------------------------------------


def _figures(r: Result) -> dict[str, str]:
    return {
        "CPU share": f"{r.cpu_share:.0%}",
        "CPU/poll": f"{r.cpu_us_per_poll:.0f} us",
        "lateness p50/p99": f"{r.late_p50_ms:.1f} / {r.late_p99_ms:.1f} ms",
        "polls on schedule": f"{r.schedule_share:.0%}",
        "answer (mean)": _ms(r.answer_ms),
        "peak RSS": f"{r.peak_rss_mb:.0f} MB",
    }


def rows(quick: bool) -> list[Any]:
    """The ``plcs`` section: linectl at 500, 1,000 and 2,000 PLCs, then the anchors."""
    from supervisor import Row

    seconds = 3.0 if quick else 5.0
    out = []
    ours: dict[int, Result] = {}
    for plcs in [500, 2000] if quick else [500, 1000, 2000]:
        r = ours[plcs] = measure("linectl", plcs, seconds)
        verdict = ""
        if plcs == 2000:
            ok = r.cpu_share <= 1.0 and r.late_p99_ms <= 5.0 and r.schedule_share >= 0.99
            verdict = f"one core, p99 <= 5 ms: {'ok' if ok else 'MISSED'}"
        out.append(Row("plcs", f"linectl, {plcs:,} PLCs at 100 ms", _figures(r), verdict))
    # The anchors on asyncio's loop, 200 PLCs (pymodbus' plain client loop hung at 500 here,
    # on either loop), beside linectl on the same loop and PLCs.
    ref = measure("linectl", ANCHOR_PLCS, seconds, loop="asyncio")
    out.append(Row("plcs", f"linectl on asyncio's loop, {ANCHOR_PLCS} PLCs", _figures(ref)))
    for poller in ("pymodbus", "raw"):
        try:
            r = measure(poller, ANCHOR_PLCS, seconds, loop="asyncio")
        except Exception as exc:  # a hung anchor must not lose the other rows
            out.append(Row("plcs", f"anchor: {poller}", {"failed": f"{exc!r}"[:80]}))
            continue
        figures = _figures(r)
        figures["linectl / this, CPU per poll"] = f"{ref.cpu_us_per_poll / r.cpu_us_per_poll:.2f}x"
        out.append(Row("plcs", f"anchor: {poller} on asyncio's loop, {ANCHOR_PLCS} PLCs", figures))
    return out


def loop_rows(quick: bool) -> list[Any]:
    """uvloop against asyncio's loop: the same 1,000 PLCs, each loop in turn."""
    from supervisor import Row

    seconds = 3.0 if quick else 5.0
    runs = {loop: measure("linectl", 1000, seconds, loop=loop) for loop in ("asyncio", "uvloop")}
    out = []
    for loop, r in runs.items():
        figures = _figures(r)
        if loop == "uvloop":
            gain = runs["asyncio"].cpu_us_per_poll / r.cpu_us_per_poll
            figures["CPU per poll, asyncio / uvloop"] = f"{gain:.2f}x"
        out.append(Row("loop", f"linectl on {loop}, 1,000 PLCs at 100 ms", figures))
    return out
