"""The Modbus TCP wire protocol (linectl/drivers/modbus_wire.py) against a scripted PLC on a
real socket: the answers a simulator never gives (cut short, the wrong transaction, garbage),
each told as what it is and at once, never as a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from linectl.config import Line, parse_config
from linectl.contract import SlotStatus, command_words, encode_header, encode_slot_status
from linectl.drivers.core import next_poll_at
from linectl.drivers.modbus_wire import ModbusWire, Refusal, Turn, WireClosed, WireGarbled
from tests.helpers import eventually
from tests.test_modbus_driver import running

UNIT = 1
REGISTERS = list(range(100, 124))

# What the scripted PLC does with one request: bytes to send back (b"" for nothing), or None
# to close the connection after sending nothing.
Script = Callable[[int, int, bytes], bytes | None]


def frame(tid: int, pdu: bytes, *, unit: int = UNIT, protocol: int = 0) -> bytes:
    return struct.pack(">HHHB", tid, protocol, len(pdu) + 1, unit) + pdu


def answer(tid: int, unit: int, pdu: bytes) -> bytes:
    """What a PLC within the protocol answers: the registers asked for, a write's echo."""
    if pdu[0] == 3:
        first, count = struct.unpack_from(">HH", pdu, 1)
        words = REGISTERS[first : first + count]
        return frame(tid, struct.pack(f">BB{len(words)}H", 3, 2 * len(words), *words), unit=unit)
    return frame(tid, pdu[:5], unit=unit)


class ScriptedPlc(asyncio.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = b""
        self.requests: list[tuple[int, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 7:
            tid, _, length, unit = struct.unpack_from(">HHHB", self.buffer)
            if len(self.buffer) < 6 + length:
                return
            pdu, self.buffer = self.buffer[7 : 6 + length], self.buffer[6 + length :]
            self.requests.append((tid, pdu))
            out = self.script(tid, unit, pdu)
            if out is None:
                self.transport.close()
                return
            self.transport.write(out)


@contextlib.asynccontextmanager
async def plc(script: Script = answer) -> AsyncIterator[tuple[int, list[ScriptedPlc]]]:
    """A scripted PLC on 127.0.0.1; yields its port and the connections it accepted."""
    accepted: list[ScriptedPlc] = []

    def accept() -> ScriptedPlc:
        accepted.append(ScriptedPlc(script))
        return accepted[-1]

    server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for conn in accepted:
            conn.transport.abort()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def wired(script: Script = answer) -> AsyncIterator[tuple[ModbusWire, list[ScriptedPlc]]]:
    async with plc(script) as (port, accepted):
        loop = asyncio.get_running_loop()
        _, wire = await loop.create_connection(lambda: ModbusWire(UNIT), "127.0.0.1", port)
        try:
            yield wire, accepted
        finally:
            wire.close()


async def within(future: asyncio.Future, seconds: float = 1.0) -> object:
    async with asyncio.timeout(seconds):
        return await future


async def test_a_read_and_a_write_are_answered_in_turn():
    async with wired() as (wire, accepted):
        assert await within(wire.read(2, 3)) == [102, 103, 104]
        assert await within(wire.write(8, [1, 2, 3, 4, 5, 6])) is None
        assert [pdu for _, pdu in accepted[0].requests] == [
            struct.pack(">BHH", 3, 2, 3),
            struct.pack(">BHHB6H", 16, 8, 6, 12, 1, 2, 3, 4, 5, 6),
        ]
        assert wire.answered and not wire.closed


async def test_an_answer_arriving_a_byte_at_a_time_is_assembled():
    async with wired(lambda *_: b"") as (wire, accepted):  # the PLC holds its answers
        future = wire.read(0, 24)
        await eventually(lambda: accepted and accepted[0].requests, what="the request")
        for byte in answer(1, UNIT, struct.pack(">BHH", 3, 0, 24)):
            assert not future.done()
            wire.data_received(bytes([byte]))
        assert future.result() == REGISTERS


async def test_an_exception_response_is_a_refusal_with_its_name_and_the_link_stays_up():
    def refuse(tid: int, unit: int, pdu: bytes) -> bytes:
        return frame(tid, bytes([pdu[0] | 0x80, 2]))

    async with wired(refuse) as (wire, _):
        refusal = await within(wire.read(500, 2))
        assert refusal == Refusal(3, 2)
        assert str(refusal) == "ILLEGAL_DATA_ADDRESS (2)"
        assert str(await within(wire.write(8, [0] * 6))) == "ILLEGAL_DATA_ADDRESS (2)"
        assert not wire.closed


async def test_a_peer_closing_mid_request_fails_it_at_once():
    """The PLC sends a few bytes of its second answer and closes: the request fails now, not
    at a deadline, and the wire remembers the PLC had answered before."""
    answered: list[int] = []

    def cut(tid: int, unit: int, pdu: bytes) -> bytes | None:
        if answered:
            accepted[0].transport.write(answer(tid, unit, pdu)[:5])
            return None
        answered.append(tid)
        return answer(tid, unit, pdu)

    async with wired(cut) as (wire, accepted):
        assert await within(wire.read(0, 2)) == [100, 101]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(WireClosed):
            await within(wire.read(0, 2), 2.0)
        assert loop.time() - started < 0.5
        assert wire.closed and wire.answered
        with pytest.raises(WireClosed, match="not connected"):
            await within(wire.read(0, 2))


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (lambda tid, pdu: answer(tid + 7, UNIT, pdu), "answered transaction 8, expected 1"),
        (lambda tid, pdu: answer(tid, UNIT + 1, pdu), "answered for unit 2, asked unit 1"),
        (lambda tid, pdu: frame(tid, b"\x04\x02\0\0"), "answered function 4 to a request of "),
        (lambda tid, pdu: frame(tid, b"\x03\x05\0\0\0\0\0"), "a read answer of 7 bytes"),
        (lambda tid, pdu: frame(tid, b"\x03"), "a read answer of 1 bytes"),
        (lambda tid, pdu: frame(tid, pdu, protocol=9), "not a Modbus TCP answer (protocol id 9"),
        (lambda tid, pdu: b"\0\1\0\0\x01\x00\x01\x03", "length 256"),
    ],
    ids=[
        "wrong-transaction",
        "wrong-unit",
        "wrong-function",
        "bad-byte-count",
        "no-byte-count",
        "protocol-id",
        "too-long",
    ],
)
async def test_an_answer_outside_the_protocol_fails_the_request_and_closes_the_link(reply, problem):
    async with wired(lambda tid, unit, pdu: reply(tid, pdu)) as (wire, _):
        with pytest.raises(WireGarbled, match=problem.replace("(", r"\(")):
            await within(wire.read(0, 2))
        assert wire.closed and isinstance(wire.error, WireGarbled)
        await asyncio.sleep(0)  # one turn of the loop: the abort's connection_lost has run
        assert wire.transport is not None and wire.transport.is_closing()
        assert isinstance(wire.error, WireGarbled)


async def test_a_write_answer_that_does_not_echo_the_write_is_garbled():
    async with wired(lambda tid, unit, pdu: frame(tid, struct.pack(">BHH", 16, 9, 6))) as (w, _):
        with pytest.raises(WireGarbled, match="does not echo the write"):
            await within(w.write(8, [0] * 6))


async def test_a_late_answer_to_a_request_given_up_on_is_dropped():
    """The first request goes unanswered until the second is sent; then both answers come:
    the late one is dropped and the second request gets its own answer."""
    held: list[tuple[int, bytes]] = []

    def late(tid: int, unit: int, pdu: bytes) -> bytes:
        if tid == 1:
            held.append((tid, pdu))
            return b""
        old_tid, old_pdu = held[0]
        return answer(old_tid, unit, old_pdu) + answer(tid, unit, pdu)

    async with wired(late) as (wire, _):
        wire.read(0, 2).cancel()  # given up on, as the driver's deadline does
        assert await within(wire.read(4, 2)) == [104, 105]
        assert not wire.closed


async def test_an_answer_nobody_asked_for_is_garbled():
    async with wired() as (wire, _):
        assert await within(wire.read(0, 1)) == [100]
        wire.data_received(answer(1, UNIT, struct.pack(">BHH", 3, 0, 1)))
        assert wire.closed and "answered transaction 1, expected none" in str(wire.error)


# --- the driver on the wire ------------------------------------------------------------------

LINE = parse_config(
    """
line: wire
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.02, timeout_s: 0.5,
      connect_timeout_s: 0.5, heartbeat_timeout_s: 1.0, backoff_initial_s: 0.02,
      backoff_max_s: 0.1}
stations:
  s1: {plc: p, address: 0, cycle_s: 1}
flow: [s1]
"""
)
_SLOT = command_words(0, 0, 0) + encode_slot_status(SlotStatus())


def station_block(heartbeat: int) -> bytes:
    """A read answer's PDU: one single-slot station, Idle, its heartbeat at ``heartbeat``."""
    words = encode_header(heartbeat & 0xFFFF, 0, 1) + _SLOT
    return struct.pack(f">BB{len(words)}H", 3, 2 * len(words), *words)


def line_at(port: int) -> Line:
    plc = LINE.plcs["p"].model_copy(update={"port": port})
    return LINE.model_copy(update={"plcs": {"p": plc}})


async def test_the_driver_tells_a_garbled_answer_as_a_protocol_error_and_reconnects():
    def plc_answer(tid: int, unit: int, pdu: bytes) -> bytes:
        """From the fifth request on, each answer carries the next request's transaction id."""
        return frame(tid if tid < 5 else tid + 1, station_block(tid), unit=unit)

    async with plc(plc_answer) as (port, accepted), running(line_at(port)) as (_, events):
        lost = await events.connection(False)
        assert lost.reason == (
            f"plc 'p' (127.0.0.1:{port}): read of registers 0..23: protocol error: "
            "answered transaction 6, expected 5"
        )
        await events.connection(True)  # a fresh connection, transactions from 1 again
        assert len(accepted) >= 2


async def test_polls_never_overlap_and_never_burst_to_catch_up():
    """A PLC answering three intervals late gets one request at a time; once it answers at
    once again, polls come an interval apart, not back to back to make up for those missed."""
    loop = asyncio.get_running_loop()
    interval = LINE.plcs["p"].poll_interval_s
    arrivals: list[float] = []
    outstanding = [0, 0]  # now, the most ever

    def slow_then_fast(tid: int, unit: int, pdu: bytes) -> bytes:
        arrivals.append(loop.time())
        outstanding[0] += 1
        outstanding[1] = max(outstanding)
        data = frame(tid, station_block(tid), unit=unit)
        if len(arrivals) < 8:  # the connect's read, then slow polls
            loop.call_later(3 * interval, answered, accepted[-1], data)
            return b""
        outstanding[0] -= 1
        return data

    def answered(conn: ScriptedPlc, data: bytes) -> None:
        outstanding[0] -= 1
        conn.transport.write(data)

    async with plc(slow_then_fast) as (port, accepted), running(line_at(port)) as (driver, _):
        await eventually(lambda: len(arrivals) >= 20, what="twenty polls")
        assert driver.connected
    assert outstanding[1] == 1
    slow = [b - a for a, b in itertools.pairwise(arrivals[:8])]
    assert min(slow) >= 3 * interval * 0.9  # each poll waited for the answer before it
    # Once the PLC answers at once, each poll takes a point of the grid, at most one per
    # interval: those missed while the answers were slow are not made up in a burst.
    fast = arrivals[7:]
    assert len(fast) - 1 <= (fast[-1] - fast[0]) / interval + 1


def test_a_late_poll_takes_its_own_grid_point_and_skips_those_it_passed():
    assert next_poll_at(1.0, 1.01, 0.1) == pytest.approx(1.1)  # on time
    assert next_poll_at(1.0, 1.25, 0.1) == pytest.approx(1.3)  # 1.1 and 1.2 skipped
    assert next_poll_at(1.0, 1.1, 0.1) == pytest.approx(1.2)


async def test_the_turn_is_handed_in_the_order_asked_skipping_those_who_gave_up():
    turn = Turn()
    assert turn.take() and not turn.take()
    first, gave_up, last = turn.wait(), turn.wait(), turn.wait()
    gave_up.cancel()
    turn.give()
    assert first.done() and not last.done()  # the first now holds the turn
    turn.give()
    assert last.done()
    turn.give()
    assert turn.take()  # free again


async def test_waiting_for_a_turn_that_never_changes_hands_gives_up_and_leaves_no_claim():
    turn = Turn()
    assert turn.take()
    assert not await turn.acquire(0.01)  # the holder never gives it: no progress
    turn.give()  # the holder is done: nobody is left in line
    assert turn.take()


async def test_each_scheduled_read_gets_its_whole_deadline_then_half_open_is_told():
    """The polls share one deadline timer, armed by an earlier read: a read that is never
    answered still waits its own ``timeout_s`` from when it was sent, and two in a row end
    the connection as half-open."""
    loop = asyncio.get_running_loop()
    timeout = LINE.plcs["p"].timeout_s
    arrivals: list[float] = []

    def then_silent(tid: int, unit: int, pdu: bytes) -> bytes:
        arrivals.append(loop.time())
        return frame(tid, station_block(tid), unit=unit) if len(arrivals) <= 10 else b""

    async with plc(then_silent) as (port, _), running(line_at(port)) as (_, events):
        lost = await events.connection(False)
    assert "no answer to 2 requests in a row (half-open connection?)" in lost.reason
    assert len(arrivals) == 12
    # Each from its arrival, a hair after it was sent.
    assert arrivals[11] - arrivals[10] >= 0.95 * timeout
    assert lost.at - arrivals[11] >= 0.95 * timeout
