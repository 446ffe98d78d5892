"""MQTT for the plant: the line's state as a unified namespace (JSON, ISA-95 topics) and as a
Sparkplug B edge node, each on its own connection (a connection has one will: "offline" for
the namespace, NDEATH for Sparkplug).

Each publisher is fed by its own bounded subscription to the supervisor's events and writes
into an ``Outbox`` (memory while the broker is up, the disk spool while it is away); one
``MqttLink`` per connection owns connecting, its backoff, the births after every connect and
sending the outbox in order, over linectl's own MQTT 3.1.1 connection (``mqttwire``), which
never reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linectl.config import NorthboundMqtt
from linectl.drivers.base import Backoff
from linectl.errors import ConfigError
from linectl.events import LineChanged, LineEvent, StationChanged, Subscription, UnitChanged
from linectl.northbound import sparkplug
from linectl.northbound.mqttwire import MqttConnection, MqttError, MqttRefused
from linectl.northbound.spool import Message, Outbox
from linectl.northbound.view import LineView, line_values, station_values
from linectl.tls import client_context, describe_tls_error

log = logging.getLogger("linectl.northbound")
WINDOW = 100  # messages handed to the broker and not yet acknowledged, per connection


@dataclass(frozen=True, slots=True)
class LinkStatistics:
    name: str  # uns | sparkplug
    connected: bool
    connects: int
    connect_failures: int
    published: int
    queued: int  # messages waiting, memory and spool
    memory_dropped: int  # dropped from memory: the broker was too slow
    spool_messages: int
    spool_bytes: int
    spool_max_messages: int
    spool_max_bytes: int
    spool_dropped: int  # dropped past the spool's bound during an outage
    events_dropped: int  # events dropped before they were rendered (feed too slow)


class Publisher:
    """What one connection publishes: births after a connect, and its outbox's messages."""

    name = ""

    def __init__(self, view: LineView, outbox: Outbox) -> None:
        self.view = view
        self.outbox = outbox
        self.subscription: Subscription | None = None

    def will(self) -> Message:
        raise NotImplementedError

    def on_event(self, event: LineEvent) -> None:
        raise NotImplementedError

    def births(self) -> list[Message]:
        """Sent first after every connect, before anything from the outbox."""
        return []

    def snapshot(self) -> list[Message]:
        """Queued behind the outbox after every connect (the retained current values)."""
        return []

    def goodbye(self) -> Message | None:
        """Sent on a clean stop, where the will would have been on a lost connection."""
        return None

    def prepare(self, message: Message, delayed: bool) -> bytes:
        return message.payload

    subscriptions: tuple[str, ...] = ()

    def on_message(self, topic: str, payload: bytes) -> bool:
        """A message on a subscribed topic; True asks for births again."""
        return False

    async def feed(self) -> None:
        """Render the line's events into the outbox, for ever; never waits for the broker."""
        assert self.subscription is not None
        while True:
            event = await self.subscription.get()
            self.view.apply(event)
            self.on_event(event)


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), default=str).encode()


class UnsPublisher(Publisher):
    """The unified namespace: ``<topic_prefix>/<line>/...`` JSON, retained where a late
    subscriber needs the current value (docs/northbound.md lists the topics)."""

    name = "uns"

    def __init__(self, view: LineView, outbox: Outbox, prefix: str, line: str, qos: int) -> None:
        super().__init__(view, outbox)
        self.base = f"{prefix}/{line}"
        self.qos = qos
        self._last: dict[str, dict[str, Any]] = {}  # topic -> last payload, without time

    def will(self) -> Message:
        return Message(f"{self.base}/status", _json({"online": False}), 1, True)

    def births(self) -> list[Message]:
        return [Message(f"{self.base}/status", _json({"online": True}), 1, True)]

    def goodbye(self) -> Message:
        return Message(f"{self.base}/status", _json({"online": False}), 1, True)

    def snapshot(self) -> list[Message]:
        out = [self._retained(*self._line(self.view.line))]
        out.append(self._retained(*self._quarantine()))
        for ev in self.view.stations.values():
            out.extend(self._retained(*pair) for pair in self._station(ev))
        return out

    def on_event(self, event: LineEvent) -> None:
        if isinstance(event, StationChanged):
            pairs = self._station(event)
        elif isinstance(event, LineChanged):
            pairs = [self._line(event)]
        elif isinstance(event, UnitChanged):
            data = {
                "unit_id": event.unit_id,
                "serial": event.serial,
                "station": event.station,
                "reason": event.reason,
                "at": event.wall.isoformat(),
            }
            self.outbox.put(Message(f"{self.base}/units/{event.kind}", _json(data), self.qos))
            pairs = [self._quarantine()] if "quarantine" in event.kind else []
        else:
            pairs = []
        for topic, data, wall in pairs:
            if self._last.get(topic) != data:
                self.outbox.put(self._retained(topic, data, wall))

    def _retained(self, topic: str, data: dict[str, Any], wall: str) -> Message:
        self._last[topic] = data
        return Message(topic, _json({**data, "at": wall}), self.qos, True)

    def _line(self, ev: LineChanged) -> tuple[str, dict[str, Any], str]:
        data = {
            "released": ev.released,
            "finished": ev.finished,
            "quarantined": ev.quarantined,
            "wip": ev.wip,
            "paused": ev.paused,
        }
        return f"{self.base}/line", data, ev.wall.isoformat()

    def _quarantine(self) -> tuple[str, dict[str, Any], str]:
        serials = sorted(self.view.quarantined.values())
        return f"{self.base}/quarantine", {"serials": serials}, self.view.line.wall.isoformat()

    def _station(self, ev: StationChanged) -> list[tuple[str, dict[str, Any], str]]:
        wall = ev.wall.isoformat()
        state = {
            "state": ev.state,
            "state_name": ev.state_name,
            "condition": ev.condition,
            "units": list(ev.units),
            "load": ev.load,
            "capacity": ev.capacity,
            "in_service": ev.in_service,
            "connected": ev.connected,
        }
        counts = {
            "cycles": ev.cycles,
            "passed": ev.passed,
            "rejected": ev.rejected,
            "faults": ev.faults,
        }
        station = f"{self.base}/{ev.station}"
        return [(f"{station}/state", state, wall), (f"{station}/counts", counts, wall)]


class SparkplugPublisher(Publisher):
    """Sparkplug B: NBIRTH/DBIRTH after every connect, DDATA/NDATA with what changed,
    NDEATH as the will; a Rebirth command (NCMD) sends the births again."""

    name = "sparkplug"

    def __init__(
        self, view: LineView, outbox: Outbox, node: sparkplug.EdgeNode, bd_seq_file: Path
    ) -> None:
        super().__init__(view, outbox)
        self.node = node
        self.bd_seq_file = bd_seq_file
        self.subscriptions = (sparkplug.topic(node.group, "NCMD", node.node),)
        self._devices = {name: station_values(ev) for name, ev in view.stations.items()}
        self._line = line_values(view.line, len(view.quarantined))

    @staticmethod
    def stored_bd_seq(path: Path) -> int:
        """The bdSeq the next CONNECT carries, kept across restarts (0 the first time)."""
        try:
            return int(path.read_text().strip()) % 256
        except (OSError, ValueError):
            return 0

    def will(self) -> Message:
        death = self.node.connecting()
        with contextlib.suppress(OSError):  # the spool's directory; a lost number costs nothing
            self.bd_seq_file.write_text(f"{self.node.bd_seq}\n")
        return Message(sparkplug.topic(self.node.group, "NDEATH", self.node.node), death, 1)

    def births(self) -> list[Message]:
        return [Message(topic, data) for topic, data in self.node.births(self._line, self._devices)]

    def goodbye(self) -> Message:
        topic = sparkplug.topic(self.node.group, "NDEATH", self.node.node)
        return Message(topic, self.node.death(), 1)

    def prepare(self, message: Message, delayed: bool) -> bytes:
        return self.node.data(message.payload, historical=delayed)

    def on_message(self, topic: str, payload: bytes) -> bool:
        return sparkplug.rebirth_requested(payload)

    def on_event(self, event: LineEvent) -> None:
        if isinstance(event, StationChanged):
            values = station_values(event)
            last = self._devices.setdefault(event.station, {})
            changed = {k: v for k, v in values.items() if last.get(k) != v}
            if changed:
                last.update(changed)
                topic = sparkplug.topic(self.node.group, "DDATA", self.node.node, event.station)
                self._put(topic, changed, event.wall)
        elif isinstance(event, LineChanged | UnitChanged):
            values = line_values(self.view.line, len(self.view.quarantined))
            changed = {k: v for k, v in values.items() if self._line.get(k) != v}
            if changed:
                self._line.update(changed)
                topic = sparkplug.topic(self.node.group, "NDATA", self.node.node)
                self._put(topic, changed, event.wall)

    def _put(self, topic: str, values: dict[str, Any], wall: Any) -> None:
        data = sparkplug.payload(values, sparkplug.millis(wall)).SerializeToString()
        self.outbox.put(Message(topic, data))


class MqttLink:
    """One connection to the broker for one publisher: connect (with its will), births, then
    the outbox in order with up to ``WINDOW`` messages unacknowledged; on any failure the
    outbox goes to the spool and we reconnect with backoff. Failures are logged once per
    outage, naming the setting to look at."""

    def __init__(
        self,
        cfg: NorthboundMqtt,
        publisher: Publisher,
        client_id: str,
        password: str | None,
    ) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.outbox = publisher.outbox
        self.client_id = client_id
        self.password = password
        self.connected = False
        self.connects = 0
        self.connect_failures = 0
        self.published = 0
        self._conn: MqttConnection | None = None
        self._rebirth = False
        self._closing = False
        self._down_since: float | None = time.monotonic()
        self._reported = ""

    @property
    def where(self) -> str:
        return f"northbound.mqtt ({self.publisher.name}, {self.cfg.host}:{self.cfg.port})"

    def statistics(self) -> LinkStatistics:
        spool = self.outbox.spool
        sub = self.publisher.subscription
        return LinkStatistics(
            name=self.publisher.name,
            connected=self.connected,
            connects=self.connects,
            connect_failures=self.connect_failures,
            published=self.published,
            queued=len(self.outbox),
            memory_dropped=self.outbox.dropped,
            spool_messages=len(spool),
            spool_bytes=spool.nbytes,
            spool_max_messages=spool.max_messages,
            spool_max_bytes=spool.max_bytes,
            spool_dropped=spool.dropped,
            events_dropped=sub.dropped if sub is not None else 0,
        )

    async def run(self) -> None:
        backoff = Backoff(self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
        cfg, login = self.cfg, self.cfg.login
        while not self._closing:
            try:
                # Files are read at every connect: rotated certificates take effect then.
                tls = None if cfg.tls is None else client_context(cfg.tls, "northbound.mqtt.tls")
                conn = await MqttConnection.open(
                    cfg.host,
                    cfg.port,
                    self.client_id,
                    connect_timeout_s=cfg.connect_timeout_s,
                    timeout_s=cfg.timeout_s,
                    keepalive_s=cfg.keepalive_s,
                    will=self.publisher.will(),
                    username=login.user if login else None,
                    password=self.password,
                    tls=tls,
                    server_hostname=cfg.tls.server_hostname if cfg.tls else None,
                    on_activity=self.outbox.wake,
                    on_message=self._on_message,
                )
                backoff.reset()
                await self._session(conn)
            except (MqttError, TimeoutError, OSError, ConfigError) as exc:
                if self._closing:
                    return  # close() said goodbye and disconnected
                self._lost(exc)
            await asyncio.sleep(backoff.next_delay())

    async def _session(self, conn: MqttConnection) -> None:
        self._conn = conn
        self.connects += 1
        try:
            for topic in self.publisher.subscriptions:
                async with asyncio.timeout(self.cfg.timeout_s):
                    await conn.subscribe(topic, qos=1)
            for message in self.publisher.births():
                conn.publish(message.topic, message.payload, message.qos, message.retain)
            self.connected = True
            if self._reported and self._down_since is not None:
                after = time.monotonic() - self._down_since
                log.info("%s: connected after %.1f s down", self.where, after)
            self._down_since = None
            self._reported = ""
            self.outbox.go_online()
            for message in self.publisher.snapshot():
                self.outbox.put(message)
            await self._pump(conn)
        finally:
            self._conn = None
            self.connected = False
            self.outbox.go_offline()
            conn.abort()

    async def _pump(self, conn: MqttConnection) -> None:
        """The outbox, in order, with up to WINDOW messages handed over and not yet confirmed
        (a sliding window: each acknowledgement lets the next one go at once). A message
        leaves the outbox only when the broker has it, so after a lost connection everything
        unconfirmed is sent again (at least once, never lost)."""
        window: deque[int] = deque()  # packet id per message sent from the head; 0: QoS 0
        outbox, publisher = self.outbox, self.publisher
        while True:
            if conn.lost is not None:
                raise MqttError(str(conn.lost))
            while window and conn.acked(window[0]):
                window.popleft()
                outbox.pop()
                self.published += 1
            if self._rebirth:
                self._rebirth = False
                for message in publisher.births():
                    conn.publish(message.topic, message.payload, message.qos, message.retain)
            sent = len(window)
            if sent < WINDOW and conn.writable:
                batch = outbox.head(WINDOW, start=sent)
                for message, delayed in batch:
                    payload = publisher.prepare(message, delayed)
                    window.append(conn.publish(message.topic, payload, message.qos, message.retain))
                if batch:
                    # Written now, so a full transport buffer stops the next batch; and a
                    # long spool drain shares the loop with the line, a batch at a time.
                    conn.flush()
                    await asyncio.sleep(0)
                    continue  # QoS 0 messages are done once written: pop them next round
            await outbox.changed()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.publisher.on_message(topic, payload):
            log.info("%s: rebirth requested by %s", self.where, topic)
            self._rebirth = True
            self.outbox.wake()

    def _lost(self, exc: BaseException) -> None:
        self.connected = False
        self.connect_failures += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
        reason = _reason(exc, self.cfg)
        if reason != self._reported:
            self._reported = reason
            log.warning("%s: %s; spooling, retrying with backoff", self.where, reason)

    async def close(self) -> None:
        """Say goodbye (offline / NDEATH) where the will would have, if still connected, then
        DISCONNECT so the broker drops the will."""
        self._closing = True
        conn, goodbye = self._conn, self.publisher.goodbye()
        if conn is None or conn.lost is not None:
            return
        if goodbye is not None:
            conn.publish(goodbye.topic, goodbye.payload, goodbye.qos, goodbye.retain)
            await conn.settled(self.cfg.timeout_s)
        conn.disconnect()


def _reason(exc: BaseException, cfg: NorthboundMqtt) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConfigError):
        return f"TLS: {'; '.join(exc.problems)}"
    if isinstance(exc, ssl.SSLError):
        why = describe_tls_error(exc, peer="the broker", plaintext="a plain MQTT port")
        return f"TLS: {why} (check northbound.mqtt.tls)"
    if isinstance(exc, MqttRefused) and exc.rc in (4, 5):
        user = f"user '{cfg.login.user}'" if cfg.login else "anonymous login"
        return f"the broker refused {user}: {text} (check northbound.mqtt.login)"
    if isinstance(exc, MqttRefused):
        return f"the broker refused the connection: {text} (check northbound.mqtt.client_id)"
    if isinstance(exc, TimeoutError):
        return "timed out (check northbound.mqtt.host and port)"
    if isinstance(exc, OSError) and not isinstance(exc, MqttError):
        why = os.strerror(exc.errno) if exc.errno else text
        return f"cannot connect: {why} (check northbound.mqtt.host and port)"
    return f"connection lost: {text}"


async def run_publisher(link: MqttLink) -> None:
    """The feed and the link of one publisher, until cancelled."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(link.publisher.feed(), name=f"mqtt-{link.publisher.name}-feed")
        tg.create_task(link.run(), name=f"mqtt-{link.publisher.name}")
