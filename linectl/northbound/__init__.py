"""Plant integration: the line's state for SCADA, MES and historians, over an OPC UA server,
an MQTT unified namespace and Sparkplug B (docs/northbound.md).

Everything here is fed from the supervisor's events through bounded subscriptions and runs
beside the line: a broker or OPC UA client that is slow, wrong or gone is logged once, shows
on the metrics, and never stops or slows the line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linectl.config import Line, NorthboundMqtt
from linectl.northbound.mqtt import (
    LinkStatistics,
    MqttLink,
    Publisher,
    SparkplugPublisher,
    UnsPublisher,
    run_publisher,
)
from linectl.northbound.sparkplug import EdgeNode
from linectl.northbound.spool import Outbox, Spool
from linectl.northbound.view import LineView
from linectl.security import read_secret

log = logging.getLogger("linectl.northbound")


@dataclass(frozen=True, slots=True)
class NorthboundStatistics:
    links: tuple[LinkStatistics, ...]
    opcua_up: bool | None  # None: not configured
    opcua_sessions: int
    opcua_events_dropped: int


class Northbound:
    """The northbound parts of one running line. ``await start()``, then ``await stop()``."""

    def __init__(self, sup: Any, line: Line) -> None:
        self.sup = sup
        self.line = line
        self.links: list[MqttLink] = []
        self.opcua: Any = None
        self.where: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._spools: list[Spool] = []

    def statistics(self) -> NorthboundStatistics:
        server = self.opcua
        return NorthboundStatistics(
            links=tuple(link.statistics() for link in self.links),
            opcua_up=None if server is None else server.up,
            opcua_sessions=0 if server is None else server.sessions(),
            opcua_events_dropped=0 if server is None else server.events_dropped(),
        )

    async def start(self) -> None:
        nb = self.line.northbound
        if nb is None:
            return
        if nb.mqtt is not None:
            self._mqtt(nb.mqtt)
        if nb.opcua is not None:
            from linectl.northbound.opcua_server import NorthboundServer

            # Started in the background: asyncua takes seconds to build its address space,
            # and the line does not wait for it.
            self.opcua = NorthboundServer(self.sup, self.line, nb.opcua)
            self.where.append(f"opc ua server {self.opcua.url}")
        self._task = asyncio.create_task(self._run(), name="northbound")

    def _mqtt(self, cfg: NorthboundMqtt) -> None:
        password = None
        if cfg.login is not None:
            try:
                password = read_secret(cfg.login.password_env, cfg.login.password_file)
            except ValueError as exc:
                log.error("northbound.mqtt.login: %s; MQTT stays off, the line runs on", exc)
                return
        spool_dir = cfg.spool.dir or Path.cwd() / f"{self.line.line}.spool"
        base_id = cfg.client_id or f"linectl-{self.line.line}"
        publishers: list[Publisher] = []
        try:
            if cfg.uns is not None:
                publishers.append(
                    UnsPublisher(
                        LineView.of(self.sup),
                        self._outbox(cfg, spool_dir / "uns.spool"),
                        cfg.uns.topic_prefix,
                        self.line.line,
                        cfg.uns.qos,
                    )
                )
            if cfg.sparkplug is not None:
                bd_seq_file = spool_dir / "sparkplug.bdseq"
                node = EdgeNode(
                    cfg.sparkplug.group_id,
                    cfg.sparkplug.edge_node_id or self.line.line,
                    SparkplugPublisher.stored_bd_seq(bd_seq_file),
                )
                publishers.append(
                    SparkplugPublisher(
                        LineView.of(self.sup),
                        self._outbox(cfg, spool_dir / "sparkplug.spool"),
                        node,
                        bd_seq_file,
                    )
                )
        except OSError as exc:
            log.error(
                "northbound.mqtt.spool.dir: cannot use %s: %s; MQTT stays off, the line runs on",
                spool_dir,
                exc.strerror or exc,
            )
            return
        for publisher in publishers:
            publisher.subscription = self.sup.events.subscribe(
                name=f"mqtt-{publisher.name}", maxsize=cfg.queue
            )
            link = MqttLink(cfg, publisher, f"{base_id}-{publisher.name}", password)
            self.links.append(link)
        self.where.append(f"mqtt {cfg.host}:{cfg.port} ({', '.join(p.name for p in publishers)})")

    def _outbox(self, cfg: NorthboundMqtt, path: Path) -> Outbox:
        spool = Spool(path, max_messages=cfg.spool.max_messages, max_bytes=cfg.spool.max_bytes)
        self._spools.append(spool)
        return Outbox(spool, cfg.queue)

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for link in self.links:
                tg.create_task(_guard(run_publisher(link), link.where), name=link.where)
            if self.opcua is not None:
                tg.create_task(_guard(self.opcua.serve(), "northbound.opcua"), name="opcua")

    async def stop(self) -> None:
        for link in self.links:
            await link.close()
        if self._task is not None:
            self._task.cancel()
            try:
                async with asyncio.timeout(5):
                    # Our own cancellation still propagates out of gather; the task's does not.
                    await asyncio.gather(self._task, return_exceptions=True)
            except TimeoutError:
                log.error("northbound did not stop within 5 s of being cancelled: %s", self._task)
            self._task = None
        for link in self.links:
            if link.publisher.subscription is not None:
                link.publisher.subscription.close()
        for spool in self._spools:
            spool.close()
        if self.opcua is not None:
            await self.opcua.stop()


async def _guard(coro: Any, what: str) -> None:
    """Run one northbound part; a bug in it is logged, and the line runs on without it."""
    try:
        await coro
    except Exception:
        log.exception("%s stopped by an unexpected error; the line runs on without it", what)


async def start_northbound(sup: Any, line: Line) -> Northbound:
    nb = Northbound(sup, line)
    await nb.start()
    return nb
