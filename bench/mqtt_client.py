"""CPU per published MQTT message: linectl's own connection against aiomqtt and paho-mqtt.

    .venv/bin/python bench/mqtt_client.py [--messages N]

Needs Mosquitto on 127.0.0.1:1883. Each client publishes N station-state-sized messages (ten
topics, a millisecond's pause every ten messages, as a line's changes come) and waits until
the broker has acknowledged all of them; the row is this process's CPU divided by N, each
client in a fresh process. This is the figure that decided issue 15's MQTT client
(docs/northbound.md, "How it is built"):

- ``aiomqtt``: ``await client.publish(...)`` in a task per message (a future, a timeout);
- ``paho``: paho-mqtt's own ``publish`` on aiomqtt's connection, completions counted in its
  ``on_publish`` callback (no task, no future);
- ``linectl``: ``linectl.northbound.mqttwire.MqttConnection.publish``, acknowledgements
  counted by ``acked``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BROKER = ("127.0.0.1", 1883)
PAYLOAD = (
    b'{"state":6,"state_name":"Execute","condition":"working","units":["U000123"],'
    b'"load":1,"capacity":1,"in_service":true,"connected":true,"at":"2026-11-30T00:00:00Z"}'
)


async def _aiomqtt(n: int, qos: int, paho: bool) -> float:
    import aiomqtt

    topic = f"bench/mqtt/{uuid.uuid4().hex[:8]}"
    quiet = logging.getLogger("bench.aiomqtt")
    quiet.setLevel(logging.CRITICAL)  # it warns of every pending publish past ten
    async with aiomqtt.Client(*BROKER, logger=quiet) as client:
        done = asyncio.Event()
        count = 0
        inner = client._client  # paho's, under aiomqtt
        original = inner.on_publish

        def on_publish(*args: object) -> None:
            nonlocal count
            original(*args)
            count += 1
            if count >= n:
                done.set()

        inner.on_publish = on_publish
        cpu = time.process_time()
        tasks = []
        for _ in range(0, n, 10):
            for j in range(10):
                if paho:
                    inner.publish(f"{topic}/s{j}/state", PAYLOAD, qos, True)
                else:
                    tasks.append(
                        asyncio.create_task(
                            client.publish(f"{topic}/s{j}/state", PAYLOAD, qos, True)
                        )
                    )
            await asyncio.sleep(0.001)
        async with asyncio.timeout(60):
            await done.wait()
            await asyncio.gather(*tasks)
        return time.process_time() - cpu


async def _linectl(n: int, qos: int) -> float:
    from linectl.northbound.mqttwire import MqttConnection

    topic = f"bench/mqtt/{uuid.uuid4().hex[:8]}"
    progress = asyncio.Event()
    conn = await MqttConnection.open(
        *BROKER,
        f"bench-{uuid.uuid4().hex[:8]}",
        connect_timeout_s=5,
        timeout_s=10,
        keepalive_s=30,
        on_activity=progress.set,
    )
    try:
        cpu = time.process_time()
        for _ in range(0, n, 10):
            for j in range(10):
                conn.publish(f"{topic}/s{j}/state", PAYLOAD, qos, True)
            await asyncio.sleep(0.001)
        conn.flush()
        async with asyncio.timeout(60):
            while conn.pending:  # QoS 1: until the broker has acknowledged every one
                progress.clear()
                await progress.wait()
        return time.process_time() - cpu
    finally:
        conn.disconnect()


def _one(client: str, n: int, qos: int, out: mp.Queue) -> None:
    if client == "linectl":
        cpu = asyncio.run(_linectl(n, qos))
    else:
        cpu = asyncio.run(_aiomqtt(n, qos, paho=client == "paho"))
    out.put(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5_000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{args.messages} messages of {len(PAYLOAD)} bytes, load {os.getloadavg()[0]:.2f}")
    print(f"{'client':10} {'QoS':>3}  CPU per message")
    for client in ("aiomqtt", "paho", "linectl"):
        for qos in (0, 1):
            out: mp.Queue = ctx.Queue()
            proc = ctx.Process(target=_one, args=(client, args.messages, qos, out))
            proc.start()
            cpu = out.get(timeout=120)
            proc.join(10)
            print(f"{client:10} {qos:>3}  {cpu / args.messages * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
