"""The line as an OPC UA server for SCADA and MES: read-only nodes that change with the line,
and, for users in the operator role only, methods for Pause, Drain and ReleaseQuarantined.

Secure by default, as the PLC side is (drivers/opcua_server_security.py): no None endpoint, no
anonymous login, client certificates checked against a trust list, passwords from the
environment or a file. ``allow_anonymous`` adds a read-only None endpoint, on loopback only.

The server runs on an event loop of its own, in its own thread: asyncua's start (seconds of
CPU building the standard address space), its subscriptions' publishing and whatever a client
asks for never hold up the line's loop, whose longest wait for it is then the interpreter's
switch interval. The line's side keeps a bounded subscription to the supervisor's events and
hands the server one batch at a time (coalesced: a slow server costs a node's intermediate
values, never a handover); operator methods run on the line's loop. Throughput, OEE, the
bottleneck and cycle times are figures of elapsed time, refreshed from ``statistics()`` every
``kpi_interval_s``, not per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from asyncua import Server, ua
from asyncua.common.node import Node

from linectl.analysis import analyze
from linectl.config import Line, NorthboundOpcUa
from linectl.drivers.opcua_server_security import anonymous_read_only, secure_server, stop_server
from linectl.events import LineEvent, StationChanged, Subscription
from linectl.metrics import constraint_of, line_oee
from linectl.northbound.view import LineView, line_values, station_values
from linectl.security import read_secret

log = logging.getLogger("linectl.northbound")

NAMESPACE = "urn:linectl:northbound"
V = ua.VariantType
VALUE = ua.AttributeIds.Value
STATION_TYPES = {
    "State": V.Int32,
    "StateName": V.String,
    "Condition": V.String,
    "UnitSerial": V.String,
    "Load": V.UInt32,
    "Capacity": V.UInt32,
    "InService": V.Boolean,
    "Connected": V.Boolean,
    "CycleTime": V.Double,
    "Counts/Cycles": V.UInt64,
    "Counts/Passed": V.UInt64,
    "Counts/Rejected": V.UInt64,
    "Counts/Faults": V.UInt64,
}
LINE_TYPES = {
    "Line/Released": V.UInt64,
    "Line/Finished": V.UInt64,
    "Line/Quarantined": V.UInt32,
    "Line/WIP": V.UInt32,
    "Line/Paused": V.Boolean,
    "Line/Throughput": V.Double,
    "Line/PredictedThroughput": V.Double,
    "Line/Bottleneck": V.String,
    "Line/OEE": V.Double,
}
THROUGHPUT_WINDOW_S = 300.0
T = TypeVar("T")


class NorthboundServer:
    def __init__(self, sup: Any, line: Line, cfg: NorthboundOpcUa) -> None:
        self.sup = sup
        self.line = line
        self.cfg = cfg
        self.up = False
        self.port = cfg.port
        self.analysis = analyze(line)
        self._server: Server | None = None
        self._nodes: dict[str, ua.NodeId] = {}  # "Line/WIP", "Stations/a/State" -> node id
        self._kinds: dict[str, V] = {}  # the same keys -> variant type
        self._values: dict[str, Any] = {}  # last value written per node
        self._subscription: Subscription | None = None
        self._sessions = 0  # activated sessions, counted in the server's thread
        self.started = asyncio.Event()  # set once start() has succeeded or given up
        self._line_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, in its thread
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None  # the server's loop's

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.cfg.host}:{self.port}{self.cfg.path}"

    def sessions(self) -> int:
        return self._sessions if self._server is not None else 0

    def _count_sessions(self) -> None:
        """In the server's thread, where asyncua changes its sessions."""
        server = self._server
        if server is not None:
            sessions = server.iserver._external_sessions.values()
            self._sessions = sum(1 for s in sessions if s.is_activated())

    def events_dropped(self) -> int:
        return self._subscription.dropped if self._subscription is not None else 0

    # --- life cycle ---------------------------------------------------------------------

    async def _start(self, view: LineView) -> bool:
        """In the server's thread: listen; False (after one log line naming the setting) if
        it cannot."""
        cfg = self.cfg
        try:
            users = {
                name: read_secret(u.password_env, u.password_file) for name, u in cfg.users.items()
            }
        except ValueError as exc:
            log.error("northbound.opcua.users: %s; the OPC UA server stays off", exc)
            return False
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://{cfg.host}:{cfg.port}{cfg.path}")
        server.set_server_name(f"linectl line {self.line.line}")
        server.disable_clock(True)  # stop() would wait up to a second for its sleep
        try:
            if cfg.security is None:
                # Only reachable with allow_anonymous (config.py): read-only, loopback.
                anonymous_read_only(server, cfg.max_sessions)
            else:
                sec = cfg.security
                await secure_server(
                    server,
                    certificate=sec.certificate,
                    private_key=sec.private_key,
                    trust=sec.trust,
                    application_uri=sec.application_uri,
                    policies=[(p, sec.mode) for p in sec.policies],
                    users=users,
                    operators=[n for n, u in cfg.users.items() if u.role == "operator"],
                    allow_anonymous=cfg.allow_anonymous,
                    max_sessions=cfg.max_sessions,
                )
        except (OSError, ValueError) as exc:
            log.error("northbound.opcua.security: %s; the OPC UA server stays off", exc)
            return False
        await self._build(server, view)
        try:
            with _without_traceback("asyncua.server.server"):
                await server.start()
        except OSError as exc:
            with contextlib.suppress(Exception):
                await server.stop()
            log.error(
                "northbound.opcua.port: cannot listen on %s:%s: %s; the OPC UA server stays off, "
                "the line runs on",
                cfg.host,
                cfg.port,
                exc.strerror or exc,
            )
            return False
        assert server.bserver is not None
        self.port = server.bserver.port  # the real one when asked for port 0
        self._server = server
        self._view = view
        self.up = True
        log.info("northbound OPC UA server on %s", self.url)
        return True

    async def serve(self) -> None:
        """Start the server's thread, then keep the nodes current until cancelled (or return
        if it cannot start)."""
        self._line_loop = asyncio.get_running_loop()
        # Subscribed before the snapshot: an event in between is applied on top of it (events
        # carry whole states), never lost.
        self._subscription = self.sup.events.subscribe(name="opcua", maxsize=10_000)
        view = LineView.of(self.sup)
        ready: asyncio.Future[bool] = self._line_loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(view, ready), name="northbound-opcua", daemon=True
        )
        self._thread.start()
        try:
            up = await ready
        finally:
            self.started.set()
        if not up:
            self._subscription.close()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._feed(), name="opcua-feed")
            tg.create_task(self._kpis(), name="opcua-kpis")

    def _thread_main(self, view: LineView, ready: asyncio.Future[bool]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve_here(view, ready))
        finally:
            loop.close()

    async def _serve_here(self, view: LineView, ready: asyncio.Future[bool]) -> None:
        """The server's thread: start, tell the line, serve until stop()."""
        assert self._line_loop is not None
        self._stopping = asyncio.Event()
        up = False
        try:
            up = await self._start(view)
        except Exception:
            log.exception("northbound OPC UA server failed to start; the line runs on")
        finally:
            self._line_loop.call_soon_threadsafe(_resolve, ready, up)
        if not up:
            return
        try:
            await self._stopping.wait()
        finally:
            server, self._server = self._server, None
            if server is not None:
                await stop_server(server)

    async def stop(self) -> None:
        self.up = False
        if self._subscription is not None:
            self._subscription.close()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop already closed
            loop.call_soon_threadsafe(self._stopping.set)
        await asyncio.to_thread(thread.join, 10)
        if thread.is_alive():
            log.error("northbound OPC UA server's thread did not stop within 10 s")

    async def _in_server(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the server's loop and wait for it here, on the line's."""
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _on_line(self, call: Callable[[], T]) -> T:
        """From the server's thread: run ``call`` on the line's loop (operator methods)."""
        assert self._line_loop is not None

        async def run() -> T:
            return call()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self._line_loop))

    # --- address space ------------------------------------------------------------------

    async def _build(self, server: Server, view: LineView) -> None:
        idx = await server.register_namespace(NAMESPACE)
        self._idx = idx
        line = await server.nodes.objects.add_object(ua.NodeId("Line", idx), f"{idx}:Line")
        values: dict[str, Any] = {
            **line_values(view.line, len(view.quarantined)),
            **self._derived(),
        }
        for key, kind in LINE_TYPES.items():
            await self._variable(line, key, key.split("/")[1], values[key], kind)
        stations = await line.add_object(ua.NodeId("Line.Stations", idx), f"{idx}:Stations")
        for name, ev in view.stations.items():
            obj = await stations.add_object(
                ua.NodeId(f"Line.Stations.{name}", idx), f"{idx}:{name}"
            )
            counts = await obj.add_object(
                ua.NodeId(f"Line.Stations.{name}.Counts", idx), f"{idx}:Counts"
            )
            svalues = {**station_values(ev), "CycleTime": self.line.stations[name].cycle_s}
            for key, kind in STATION_TYPES.items():
                parent = counts if key.startswith("Counts/") else obj
                await self._variable(
                    parent, f"Stations/{name}/{key}", key.split("/")[-1], svalues[key], kind
                )
        units = await line.add_object(ua.NodeId("Line.Units", idx), f"{idx}:Units")
        node = await units.add_variable(
            ua.NodeId("Line.Units.Quarantined", idx),
            f"{idx}:Quarantined",
            ua.Variant(sorted(view.quarantined.values()), V.String, is_array=True),
            datatype=ua.NodeId(ua.ObjectIds.String),
        )
        await node.write_attribute(ua.AttributeIds.ValueRank, ua.DataValue(ua.Variant(1, V.Int32)))
        self._nodes["Units/Quarantined"] = node.nodeid
        await self._methods(line, idx)

    async def _variable(self, parent: Node, key: str, name: str, value: Any, kind: V) -> None:
        # add_variable makes a node readable only: nobody writes what the line owns.
        nodeid = ua.NodeId("Line." + key.removeprefix("Line/").replace("/", "."), self._idx)
        node = await parent.add_variable(
            nodeid,
            f"{self._idx}:{name}",
            ua.Variant(value, kind),
            datatype=ua.NodeId(getattr(ua.ObjectIds, kind.name)),
        )
        self._nodes[key] = node.nodeid
        self._kinds[key] = kind
        self._values[key] = value

    async def _methods(self, line: Node, idx: int) -> None:
        sup = self.sup

        def arg(name: str, datatype: int) -> ua.Argument:
            a = ua.Argument()
            a.Name, a.DataType, a.ValueRank = name, ua.NodeId(datatype), -1
            return a

        def bad(code: int, why: str) -> ua.StatusCode:
            log.warning("northbound OPC UA method refused: %s", why)
            return ua.StatusCode(code)

        def do_pause(paused: ua.Variant) -> Any:
            if not isinstance(paused.Value, bool):
                return bad(ua.StatusCodes.BadTypeMismatch, "Pause takes a Boolean")
            sup.pause(paused.Value)
            log.info("operator (OPC UA): release %s", "paused" if paused.Value else "resumed")
            return []

        def do_drain(station: ua.Variant, on: ua.Variant) -> Any:
            if station.Value not in sup.stations or not isinstance(on.Value, bool):
                return bad(ua.StatusCodes.BadInvalidArgument, f"no station {station.Value!r}")
            sup.set_in_service(station.Value, not on.Value)
            log.info(
                "operator (OPC UA): station %s %s",
                station.Value,
                "drained" if on.Value else "back in service",
            )
            return []

        def do_release(serial: ua.Variant) -> Any:
            unit = next((u for u in sup.quarantined.values() if u.serial == serial.Value), None)
            if unit is None:
                return bad(
                    ua.StatusCodes.BadInvalidArgument, f"no quarantined unit {serial.Value!r}"
                )
            try:
                sup.release_quarantined(unit.id)
            except ValueError as exc:
                return bad(ua.StatusCodes.BadInvalidState, str(exc))
            log.info("operator (OPC UA): released %s from quarantine", serial.Value)
            return []

        # asyncua calls these in the server's thread; what they do to the line, the line's
        # loop does.
        async def pause(_parent: ua.NodeId, paused: ua.Variant) -> Any:
            return await self._on_line(lambda: do_pause(paused))

        async def drain(_parent: ua.NodeId, station: ua.Variant, on: ua.Variant) -> Any:
            return await self._on_line(lambda: do_drain(station, on))

        async def release(_parent: ua.NodeId, serial: ua.Variant) -> Any:
            return await self._on_line(lambda: do_release(serial))

        B, S = ua.ObjectIds.Boolean, ua.ObjectIds.String
        for name, func, args in (
            ("Pause", pause, [arg("Paused", B)]),
            ("Drain", drain, [arg("Station", S), arg("Drain", B)]),
            ("ReleaseQuarantined", release, [arg("Serial", S)]),
        ):
            await line.add_method(ua.NodeId(f"Line.{name}", idx), f"{idx}:{name}", func, args, [])

    # --- values ---------------------------------------------------------------------------

    async def _feed(self) -> None:
        """The line's side: one batch of events at a time to the server's thread (events
        arriving meanwhile wait in the bounded subscription)."""
        sub = self._subscription
        assert sub is not None
        while True:
            batch = [await sub.get(), *sub.drain()]
            await self._in_server(self._apply(batch))

    async def _apply(self, batch: list[LineEvent]) -> None:
        """The server's thread: the events on the view, and every changed value on a node."""
        view = self._view
        touched: dict[str, StationChanged] = {}
        for event in batch:
            view.apply(event)
            if isinstance(event, StationChanged):
                touched[event.station] = event
        updates: dict[str, Any] = {}
        for name, ev in touched.items():
            for key, value in station_values(ev).items():
                updates[f"Stations/{name}/{key}"] = value
        updates.update(line_values(view.line, len(view.quarantined)))
        updates["Units/Quarantined"] = sorted(view.quarantined.values())
        await self._write(updates, batch[-1].wall)

    async def _write(
        self, updates: dict[str, Any], wall: datetime, *, count_sessions: bool = False
    ) -> None:
        """The server's thread: write what changed."""
        server = self._server
        if server is None:
            return
        if count_sessions:
            self._count_sessions()
        # The address space's own write (what Server.write_attribute_value calls two awaits
        # down): the value, then the subscriptions' data-change callbacks.
        write = server.iserver.aspace.write_attribute_value
        values, nodes, kinds = self._values, self._nodes, self._kinds
        for key, value in updates.items():
            if values.get(key) == value or key not in nodes:
                continue
            values[key] = value
            if key == "Units/Quarantined":
                variant = ua.Variant(value, V.String, is_array=True)
            else:
                variant = ua.Variant(value, kinds[key])
            await write(nodes[key], VALUE, ua.DataValue(variant, SourceTimestamp=wall))

    async def _kpis(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.kpi_interval_s)
            stats = self.sup.statistics()
            updates = self._derived(stats)
            for name, st in stats.stations.items():
                updates[f"Stations/{name}/CycleTime"] = st.ewma_cycle_s
            await self._in_server(self._write(updates, datetime.now(UTC), count_sessions=True))

    def _derived(self, stats: Any = None) -> dict[str, Any]:
        """Throughput (units/h over the last 5 min), predicted throughput, bottleneck, OEE."""
        # Statistics and analysis are both in line time (the clock undoes time_scale).
        predicted = 3600.0 / self.analysis.interval_s
        bottleneck = constraint_of(self.analysis)
        if stats is None or stats.elapsed_s <= 0:
            return {
                "Line/Throughput": 0.0,
                "Line/PredictedThroughput": predicted,
                "Line/Bottleneck": bottleneck,
                "Line/OEE": 0.0,
            }
        window = min(stats.elapsed_s, THROUGHPUT_WINDOW_S)
        recent = sum(1 for t in stats.finish_times if t >= stats.elapsed_s - window)
        busiest = max(stats.stations.values(), key=lambda s: s.utilization)
        if busiest.utilization > 0:
            bottleneck = busiest.name
        return {
            "Line/Throughput": recent * 3600.0 / window,
            "Line/PredictedThroughput": predicted,
            "Line/Bottleneck": bottleneck,
            "Line/OEE": line_oee(stats, self.analysis).oee,
        }


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _without_traceback(logger: str) -> Iterator[None]:
    """asyncua logs a failed start with a traceback before raising; we say it in one line."""
    quiet = _DropErrors()
    logging.getLogger(logger).addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(quiet)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
