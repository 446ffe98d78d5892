"""linectl's own MQTT 3.1.1 connection (linectl/northbound/mqttwire.py) against real Mosquitto:
what it publishes arrives at every QoS and is acknowledged, a refusal says why, a broker that
stops answering is a lost connection within ``timeout_s``, and garbage from a peer is one clear
error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from linectl.northbound.mqttwire import (
    MAX_PACKET,
    MqttConnection,
    MqttError,
    MqttRefused,
    _header,
    _length,
)
from linectl.northbound.spool import Message
from tests.helpers import eventually
from tests.mosquitto import Recorder, private_broker, unique


async def connect(port: int = 1883, **kwargs) -> MqttConnection:
    options = {"connect_timeout_s": 5, "timeout_s": 2, "keepalive_s": 10} | kwargs
    return await MqttConnection.open("127.0.0.1", port, unique("wire"), **options)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, MAX_PACKET])
def test_remaining_length_round_trips_at_every_width(n):
    encoded = bytearray(b"\x30" + _length(n))
    assert _header(encoded, 0) == (n, len(encoded))
    assert _header(encoded[:-1], 0) is None  # cut short: wait for the rest


def test_an_oversized_or_malformed_length_is_refused():
    with pytest.raises(MqttError, match="at most"):
        _header(bytearray(b"\x30" + _length(2_097_152)), 0)  # four bytes of length
    with pytest.raises(MqttError, match="malformed"):
        _header(bytearray(b"\x30\xff\xff\xff\xff\x01"), 0)


async def test_every_qos_arrives_and_is_acknowledged_and_a_command_comes_in():
    topic = f"test/{unique('wire')}"
    rec, received = Recorder(), []
    conn = await connect(on_message=lambda t, p: received.append((t, p)))
    try:
        async with rec.listening([f"{topic}/#"]):
            mids = [conn.publish(f"{topic}/q{q}", b"%d" % q, q, False) for q in (0, 1, 2)]
            assert mids[0] == 0 and mids[1] and mids[2]
            await eventually(lambda: all(conn.acked(m) for m in mids), what="acknowledged")
            await eventually(lambda: len(rec.messages) == 3, what="all three delivered")
            assert sorted(p for _, p, _ in rec.messages) == [b"0", b"1", b"2"]
        assert await conn.subscribe(f"{topic}/cmd", qos=1) == 1
        other = await connect()
        other.publish(f"{topic}/cmd", b"rebirth", 1)
        await eventually(lambda: received, what="the command")
        assert received == [(f"{topic}/cmd", b"rebirth")]
        other.disconnect()
    finally:
        conn.disconnect()
    assert conn.lost is not None


async def test_the_will_is_sent_on_a_lost_connection_and_not_on_a_clean_one():
    topic = f"test/{unique('will')}"
    rec = Recorder()
    async with rec.listening([f"{topic}/#"]):
        clean = await connect(will=Message(f"{topic}/clean", b"gone", 1))
        clean.disconnect()
        lost = await connect(will=Message(f"{topic}/lost", b"gone", 1))
        lost.abort()
        await eventually(lambda: rec.on(f"{topic}/lost"), what="the will")
    assert not rec.on(f"{topic}/clean")


async def test_a_refusal_says_why(tmp_path):
    async with private_broker(tmp_path / "broker", users={"linectl": "right"}) as broker:
        with pytest.raises(MqttRefused) as refused:
            await connect(broker.port, username="linectl", password="wrong")
    assert refused.value.rc in (4, 5)
    assert "not authorized" in str(refused.value) or "bad user name" in str(refused.value)


@contextlib.contextmanager
def frozen(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_broker_that_stops_answering_is_lost_within_the_timeout(tmp_path):
    """SIGSTOP: the TCP connection stays up, nothing answers. A publish waiting for its
    PUBACK, and an idle connection waiting for its PINGRESP, each end in timeout_s."""
    async with private_broker(tmp_path / "broker") as broker:
        assert broker.proc is not None
        busy = await connect(broker.port, timeout_s=0.5)
        idle = await connect(broker.port, timeout_s=0.5, keepalive_s=2)
        loop = asyncio.get_running_loop()
        with frozen(broker.proc.pid):
            start = loop.time()
            busy.publish("test/frozen", b"x", 1)
            await eventually(lambda: busy.lost is not None, within=5, what="the lost publish")
            assert loop.time() - start < 2
            assert "no answer to a message within 0.5 s" in str(busy.lost)
            await eventually(lambda: idle.lost is not None, within=6, what="the lost ping")
            assert "no answer to PINGREQ" in str(idle.lost)
        for conn in (busy, idle):
            with pytest.raises(MqttError):
                conn.publish("test/frozen", b"y", 0)


async def test_garbage_from_the_peer_is_one_protocol_error():
    """A server that answers CONNACK, then a packet type no broker sends to a client."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(b"\x20\x02\x00\x00" + b"\xf0\x00")  # CONNACK accepted, then type 15
        await writer.drain()
        await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        conn = await connect(port)
        await eventually(lambda: conn.lost is not None, what="the protocol error")
        assert str(conn.lost) == "protocol error: unexpected packet type 15"


async def test_a_long_spool_drains_a_batch_at_a_time_beside_the_line(tmp_path):
    """5,000 QoS 0 messages spooled during an outage: on connect they go out in batches, and
    the loop runs other work between batches (the line's handovers), never one long stall."""
    from linectl.config import NorthboundMqtt
    from linectl.northbound.mqtt import MqttLink, Publisher
    from linectl.northbound.spool import Outbox, Spool

    class Plain(Publisher):
        name = "plain"

        def will(self) -> Message:
            return Message(f"{topic}/status", b"offline", 1, True)

    topic = f"test/{unique('drain')}"
    outbox = Outbox(Spool(tmp_path / "s.spool", max_messages=10_000, max_bytes=1 << 24), 10)
    for i in range(5_000):
        outbox.put(Message(f"{topic}/m", b"%d" % i))  # offline: spooled
    cfg = NorthboundMqtt(uns={"topic_prefix": "test/x"})
    link = MqttLink(cfg, Plain(None, outbox), unique("drain"), None)  # type: ignore[arg-type]
    seen: list[int] = []

    async def line() -> None:
        while True:
            seen.append(len(outbox))
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        ticker = tg.create_task(line())
        pump = tg.create_task(link.run())
        await eventually(lambda: link.published == 5_000, what="the spool forwarded")
        pump.cancel()
        ticker.cancel()
    between = {n for n in seen if 0 < n < 5_000}
    assert len(between) >= 10, sorted(between)[:20]
    assert len(outbox) == 0 and len(outbox.spool) == 0
    outbox.spool.close()
