"""Prometheus metrics of a running line, read from the supervisor's ``statistics()`` at scrape
time, and the in-loop HTTP endpoint that serves them.

Nothing here runs on the dispatch path: the supervisor keeps plain counters and histograms, and
``LineCollector.collect`` turns one ``statistics()`` snapshot (plus the drivers') into metric
families when Prometheus asks. docs/metrics.md lists every metric, the OEE definitions and the
label choices. This is the only module that imports prometheus_client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    Exemplar,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from linectl.analysis import Analysis, analyze
from linectl.bottleneck import ConstraintMonitor
from linectl.config import Line
from linectl.endpoints import Endpoint, Served, make_app
from linectl.errors import LinectlError
from linectl.histogram import HistogramSnapshot
from linectl.linestate import Condition, StationStatistics, SupervisorStatistics

PREFIX = "linectl_"
# generate_latest writes the classic text format; newer clients' CONTENT_TYPE_LATEST names
# version 1.0.0, which Prometheus before 3.0 does not know. Every metric name here is a legacy
# name, so the two formats are the same bytes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Exemplars (the unit serial on cycle and lead time buckets) exist only in OpenMetrics, which
# is served to a scraper that asks for it (Prometheus does by default).
OPENMETRICS = "application/openmetrics-text"
# Database size and oldest step are read at most this often (a scrape every 15 s is common).
DB_FIGURES_EVERY_S = 60.0

log = logging.getLogger("linectl.metrics")

# linectl_station_condition's values. The order is the dashboard's legend; never renumber.
CONDITION_CODES = {
    Condition.WORKING: 0,
    Condition.STARVED: 1,
    Condition.BLOCKED: 2,
    Condition.FAULTED: 3,
    Condition.DISCONNECTED: 4,
    Condition.OUT_OF_SERVICE: 5,
}
DOWN = (Condition.FAULTED, Condition.DISCONNECTED)


@dataclass(frozen=True, slots=True)
class Oee:
    """OEE = availability × performance × quality; each factor 0 until there is time to judge."""

    availability: float
    performance: float
    quality: float

    @property
    def oee(self) -> float:
        return self.availability * self.performance * self.quality


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def station_oee(st: StationStatistics) -> Oee:
    """One station's OEE since the supervisor started (docs/metrics.md, "OEE").

    Planned time is the time in service; faulted and disconnected time are the availability
    loss; starved and blocked time stay in run time, so they are a performance loss.
    """
    planned = sum(st.seconds.values()) - st.seconds[Condition.OUT_OF_SERVICE]
    run = planned - sum(st.seconds[c] for c in DOWN)
    total = st.passed + st.rejected
    ideal = st.cycle_s / st.capacity  # line seconds per unit at nominal speed
    return Oee(
        availability=_ratio(run, planned),
        performance=_ratio(ideal * total, run),
        quality=_ratio(st.passed, total),
    )


def constraint_of(analysis: Analysis) -> str:
    """The station that paces the line: the highest predicted utilization (first on a tie)."""
    return max(analysis.stations, key=lambda name: analysis.stations[name].utilization)


def line_oee(stats: SupervisorStatistics, analysis: Analysis) -> Oee:
    """The line's OEE since the supervisor started: measured against the predicted interval.

    Planned time is the time since start; the line is down while its constraint station is
    faulted, disconnected or out of service. Performance compares units that left the line
    (finished or rejected) with what the predicted interval allows in the run time; quality is
    finished / (finished + rejected). So OEE = finished × predicted interval / planned time.
    """
    planned = stats.elapsed_s
    constraint = stats.stations[constraint_of(analysis)]
    down = sum(constraint.seconds[c] for c in (*DOWN, Condition.OUT_OF_SERVICE))
    run = planned - down
    total = stats.finished + stats.rejected
    return Oee(
        availability=_ratio(run, planned),
        performance=_ratio(analysis.interval_s * total, run),
        quality=_ratio(stats.finished, total),
    )


def cumulative_buckets(snap: HistogramSnapshot) -> list[tuple]:
    """Prometheus buckets (cumulative, ending in +Inf) from per-bucket counts; a bucket whose
    last observation carried a unit serial gets it as its exemplar (``serial="demo-000042"``)."""
    bounds = [*(repr(float(b)) for b in snap.buckets), "+Inf"]
    exemplars = snap.exemplars or (None,) * len(bounds)
    out: list[tuple] = []
    running = 0
    for le, count, ex in zip(bounds, snap.counts, exemplars, strict=True):
        running += count
        if ex is None:
            out.append((le, float(running)))
        else:
            out.append((le, float(running), Exemplar({"serial": ex[0]}, ex[1])))
    return out


class LineCollector(Collector):
    """Turns ``supervisor.statistics()`` and ``driver_statistics()`` into metric families.

    ``collect`` must run on the supervisor's event loop thread (it reads the loop's clock).
    """

    def __init__(
        self,
        supervisor: Any,
        line: Line,
        northbound: Any = None,
        constraint: ConstraintMonitor | None = None,
        forecaster: Any = None,
    ) -> None:
        self.supervisor = supervisor
        self.line = line
        self.northbound = northbound  # linectl.northbound.Northbound, when configured
        self.forecaster = forecaster  # linectl.forecast_api.Forecaster: its last forecast
        self.analysis = analyze(line)  # a pure function of the config: once, not per scrape
        self.constraint = constraint
        self.db: Any = None  # the store's latest DbFigures, refreshed by MetricsServer
        self.endpoints: list[Any] = []  # linectl.endpoints.Endpoint: their statistics()

    def describe(self) -> Iterable[Metric]:
        # Without this, registering would call collect() off the loop to learn the names.
        return []

    def collect(self) -> Iterator[Metric]:
        stats: SupervisorStatistics = self.supervisor.statistics()
        drivers = self.supervisor.driver_statistics()
        yield from self._line(stats)
        yield from self._constraint(stats.line)
        yield from self._stations(stats)
        yield from self._plcs(stats.line, drivers)
        if self.northbound is not None:
            yield from _northbound(stats.line, self.northbound.statistics())
        last = getattr(self.forecaster, "last", None)
        if last is not None:
            yield from _forecast(stats.line, last)
        yield from self._database(stats.line)
        yield from _http(stats.line, [e.statistics() for e in self.endpoints])

    def _database(self, line: str) -> Iterator[Metric]:
        if self.db is None:
            return
        size = GaugeMetricFamily(
            PREFIX + "db_size_bytes", "Size of the trace database.", labels=["line"]
        )
        size.add_metric([line], self.db.size_bytes)
        yield size
        if self.db.oldest_at is not None:
            age = GaugeMetricFamily(
                PREFIX + "db_oldest_step_age_seconds",
                "Age of the oldest step still in the trace database (linectl prune).",
                labels=["line"],
            )
            age.add_metric([line], (datetime.now(UTC) - self.db.oldest_at).total_seconds())
            yield age

    def _line(self, stats: SupervisorStatistics) -> Iterator[Metric]:
        line, scale, a = stats.line, self.line.time_scale, self.analysis
        labels = ["line"]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            m.add_metric([line], value)
            return m

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            m = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            m.add_metric([line], value)
            return m

        yield counter("units_released", "Units released into the line.", stats.released)
        yield counter("units_finished", "Units that left the line finished.", stats.finished)
        yield counter(
            "units_rejected", "Units a station rejected (then quarantined).", stats.rejected
        )
        yield counter(
            "units_quarantined",
            "Quarantinings, including units later released back into the line.",
            stats.quarantined_total,
        )
        yield gauge("quarantine_units", "Units in quarantine now.", stats.quarantined)
        yield gauge("wip_units", "Units in the line now (work in process).", stats.wip)
        yield gauge("paused", "1 while release is paused by the operator.", int(stats.paused))
        yield gauge("uptime_seconds", "Seconds since the supervisor started.", stats.elapsed_s)
        yield gauge(
            "time_scale",
            "Wall seconds per config (line) second; multiply a per-second rate by it for the "
            "line's own rate.",
            scale,
        )

        yield gauge(
            "predicted_interval_seconds",
            "Predicted time between finished units at nominal cycle times, in line seconds.",
            a.interval_s,
        )
        yield gauge(
            "predicted_throughput_units_per_second",
            "Predicted finished units per line second at nominal cycle times.",
            1 / a.interval_s,
        )
        yield gauge(
            "predicted_lead_time_seconds",
            "Predicted time one unit spends in an empty line, in line seconds.",
            a.lead_time_s,
        )

        oee = line_oee(stats, a)
        yield gauge("line_oee_ratio", "Line OEE since start (docs/metrics.md).", oee.oee)
        yield gauge("line_availability_ratio", "Line OEE availability factor.", oee.availability)
        yield gauge("line_performance_ratio", "Line OEE performance factor.", oee.performance)
        yield gauge("line_quality_ratio", "Line OEE quality factor.", oee.quality)

        yield _histogram(
            "unit_lead_time_seconds",
            "Time from release to finish of each finished unit.",
            labels,
            [([line], stats.lead_seconds)],
        )
        yield _histogram(
            "handover_seconds",
            "Time from a station reporting a unit done to the next station confirming its START.",
            labels,
            [([line], stats.handover_seconds)],
        )

    def _constraint(self, line: str) -> Iterator[Metric]:
        if self.constraint is None:
            return
        now = self.constraint.current
        info = InfoMetricFamily(
            PREFIX + "line_bottleneck",
            "The measured constraint (blocked/starved method; empty until judged), the "
            "predicted bottleneck, and the stations it shifts between.",
            labels=["line"],
        )
        info.add_metric(
            [line],
            {
                "station": now.station or "",
                "predicted": self.analysis.bottleneck,
                "shifting": ",".join(now.shifting),
            },
        )
        yield info
        moves = CounterMetricFamily(
            PREFIX + "line_constraint_moves",
            "Times the measured constraint moved from one station to another.",
            labels=["line"],
        )
        moves.add_metric([line], self.constraint.moves)
        yield moves
        active = GaugeMetricFamily(
            PREFIX + "station_active_ratio",
            "Share of the constraint window the station was neither blocked, starved nor out "
            "of service; the highest is the constraint.",
            labels=["line", "station"],
        )
        for name, share in now.active.items():
            active.add_metric([line, name], share)
        yield active

    def _stations(self, stats: SupervisorStatistics) -> Iterator[Metric]:
        line = stats.line
        labels = ["line", "station"]
        rows = list(stats.stations.values())

        def family(kind: type, name: str, doc: str, value: Any) -> Metric:
            m = kind(PREFIX + name, doc, labels=labels)
            for st in rows:
                m.add_metric([line, st.name], float(value(st)))
            return m

        G, C = GaugeMetricFamily, CounterMetricFamily
        yield family(G, "station_state", "PackML state code of slot 0.", lambda s: int(s.state))
        yield family(
            G,
            "station_condition",
            "0 working, 1 starved, 2 blocked, 3 faulted, 4 disconnected, 5 out of service.",
            lambda s: CONDITION_CODES[s.condition],
        )
        for cond in Condition:
            yield family(
                C,
                f"station_{cond.value}_seconds",
                f"Seconds the station spent {cond.value.replace('_', ' ')}.",
                lambda s, c=cond: s.seconds[c],
            )
        yield family(
            C,
            "station_busy_seconds",
            "Slot-seconds spent executing a unit (divide by capacity for utilization).",
            lambda s: s.busy_seconds,
        )
        yield family(G, "station_capacity_units", "Units in process at once.", lambda s: s.capacity)
        yield family(G, "station_load_units", "Units the station holds now.", lambda s: s.load)
        yield family(G, "station_connected", "1 while its PLC is connected.", lambda s: s.connected)
        yield family(
            G, "station_in_service", "0 when taken out of service.", lambda s: s.in_service
        )
        yield family(
            G,
            "station_utilization_ratio",
            "Busy slot-time / (capacity × time) since start.",
            lambda s: s.utilization,
        )
        predicted = self.analysis.stations
        yield family(
            G,
            "station_predicted_utilization_ratio",
            "Utilization the flow analysis predicts at the line's throughput.",
            lambda s: predicted[s.name].utilization if s.name in predicted else 0.0,
        )
        yield family(
            G,
            "station_ideal_cycle_seconds",
            "Nominal cycle_s / capacity: line seconds per unit at full speed.",
            lambda s: s.cycle_s / s.capacity,
        )

        cycles = CounterMetricFamily(
            PREFIX + "station_cycles",
            "Cycles ended, by result: pass, reject, or fault (Aborted).",
            labels=[*labels, "result"],
        )
        for st in rows:
            for result, n in (("pass", st.passed), ("reject", st.rejected), ("fault", st.faults)):
                cycles.add_metric([line, st.name, result], n)
        yield cycles

        yield _histogram(
            "station_cycle_seconds",
            "Cycle times the PLC measured, in its own (line) seconds.",
            labels,
            [([line, st.name], st.cycle_seconds) for st in rows],
        )

        factors = {st.name: station_oee(st) for st in rows}
        for name, doc, pick in (
            ("station_oee_ratio", "Station OEE since start.", lambda o: o.oee),
            ("station_availability_ratio", "Station OEE availability.", lambda o: o.availability),
            ("station_performance_ratio", "Station OEE performance.", lambda o: o.performance),
            ("station_quality_ratio", "Station OEE quality.", lambda o: o.quality),
        ):
            yield family(G, name, doc, lambda s, pick=pick: pick(factors[s.name]))

    def _plcs(self, line: str, drivers: list[Any]) -> Iterator[Metric]:
        # ``plc`` is a label here, beside line/station/branch/result: see docs/metrics.md.
        labels = ["line", "plc"]
        families = {
            "connected": GaugeMetricFamily(
                PREFIX + "plc_connected", "1 while the PLC is connected.", labels=labels
            ),
            "errors": CounterMetricFamily(
                PREFIX + "plc_request_errors",
                "Requests that failed (timeout, exception response, lost connection).",
                labels=labels,
            ),
            "reconnects": CounterMetricFamily(
                PREFIX + "plc_reconnects", "Successful connects after the first.", labels=labels
            ),
            "notifications": CounterMetricFamily(
                PREFIX + "plc_notifications", "OPC UA data changes received.", labels=labels
            ),
        }
        latency = SummaryMetricFamily(
            PREFIX + "plc_request_seconds",
            "Latency of requests to the PLC (reads, writes, calls).",
            labels=labels,
        )
        for d in drivers:
            key = [line, d.plc]
            families["connected"].add_metric(key, int(d.connected))
            families["errors"].add_metric(key, d.errors)
            families["reconnects"].add_metric(key, d.reconnects)
            families["notifications"].add_metric(key, d.notifications)
            latency.add_metric(key, count_value=d.requests, sum_value=d.request_seconds_total)
        yield from families.values()
        yield latency


def _histogram(
    name: str, doc: str, labels: list[str], rows: list[tuple[list[str], HistogramSnapshot]]
) -> HistogramMetricFamily:
    m = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    for values, snap in rows:
        m.add_metric(values, cumulative_buckets(snap), snap.sum)
    return m


def _forecast(line: str, last: Any) -> Iterator[Metric]:
    """The last forecast (linectl/forecast.py): units finished by its time, by quantile."""
    units = GaugeMetricFamily(
        PREFIX + "forecast_units",
        "Units the last forecast expects finished by its time (counting those done), by "
        "quantile over its replications.",
        labels=["line", "quantile"],
    )
    for q in (0.05, 0.5, 0.95):
        units.add_metric([line, f"{q:g}"], last.quantile(q))
    yield units
    until = GaugeMetricFamily(
        PREFIX + "forecast_until_timestamp_seconds",
        "The time the last forecast is for (Unix seconds).",
        labels=["line"],
    )
    until.add_metric([line], last.until.timestamp())
    yield until
    taken = GaugeMetricFamily(
        PREFIX + "forecast_taken_timestamp_seconds",
        "When the last forecast's snapshot of the line was taken (Unix seconds).",
        labels=["line"],
    )
    taken.add_metric([line], last.taken_at.timestamp())
    yield taken


def _northbound(line: str, nb: Any) -> Iterator[Metric]:
    """The MQTT links and the OPC UA server: outages, queues and store-and-forward bounds."""
    labels = ["line", "link"]
    G, C = GaugeMetricFamily, CounterMetricFamily
    rows = [
        (G, "connected", "1 while connected to the broker.", lambda s: int(s.connected)),
        (
            C,
            "connect_failures",
            "Failed connects and lost connections.",
            lambda s: s.connect_failures,
        ),
        (C, "published", "Messages the broker took.", lambda s: s.published),
        (G, "queued_messages", "Messages waiting (memory and spool).", lambda s: s.queued),
        (
            C,
            "memory_dropped",
            "Oldest messages dropped from memory while the broker was slow.",
            lambda s: s.memory_dropped,
        ),
        (G, "spool_messages", "Messages spooled on disk.", lambda s: s.spool_messages),
        (G, "spool_bytes", "Bytes spooled on disk.", lambda s: s.spool_bytes),
        (
            G,
            "spool_max_messages",
            "The spool's bound, in messages.",
            lambda s: s.spool_max_messages,
        ),
        (G, "spool_max_bytes", "The spool's bound, in bytes.", lambda s: s.spool_max_bytes),
        (
            C,
            "spool_dropped",
            "Oldest messages dropped past the spool's bound during an outage.",
            lambda s: s.spool_dropped,
        ),
        (C, "events_dropped", "Line events dropped before rendering.", lambda s: s.events_dropped),
    ]
    for kind, name, doc, value in rows:
        m = kind(f"{PREFIX}northbound_mqtt_{name}", doc, labels=labels)
        for link in nb.links:
            m.add_metric([line, link.name], float(value(link)))
        yield m
    if nb.opcua_up is not None:
        up = G(PREFIX + "northbound_opcua_up", "1 while the OPC UA server serves.", labels=["line"])
        up.add_metric([line], int(nb.opcua_up))
        yield up
        sessions = G(
            PREFIX + "northbound_opcua_sessions", "OPC UA client sessions.", labels=["line"]
        )
        sessions.add_metric([line], nb.opcua_sessions)
        yield sessions
        dropped = C(
            PREFIX + "northbound_opcua_events_dropped",
            "Line events the OPC UA server dropped (it fell behind).",
            labels=["line"],
        )
        dropped.add_metric([line], nb.opcua_events_dropped)
        yield dropped


def _http(line: str, endpoints: list[Any]) -> Iterator[Metric]:
    """What each HTTP endpoint refused (linectl.endpoints, docs/security.md)."""
    open_ = GaugeMetricFamily(
        PREFIX + "http_connections", "Open connections.", labels=["line", "endpoint"]
    )
    closed = CounterMetricFamily(
        PREFIX + "http_connections_closed",
        "Connections the endpoint closed itself: evicted (idle, to make room), refused (every "
        "one busy: 503) or timed_out (no request head in time).",
        labels=["line", "endpoint", "reason"],
    )
    rejected = CounterMetricFamily(
        PREFIX + "http_requests_rejected",
        "Requests refused by the rules: Host, Origin, Content-Type, size, depth, deadline.",
        labels=["line", "endpoint"],
    )
    for e in endpoints:
        open_.add_metric([line, e.name], e.connections)
        for reason in ("evicted", "refused", "timed_out"):
            closed.add_metric([line, e.name, reason], getattr(e, reason))
        rejected.add_metric([line, e.name], e.rejected)
    if endpoints:
        yield from (open_, closed, rejected)


class MetricsServer(Served):
    """``GET /metrics`` of one line, served on the event loop that runs its supervisor."""

    def __init__(
        self,
        supervisor: Any,
        line: Line,
        host: str,
        port: int,
        northbound: Any = None,
        constraint: ConstraintMonitor | None = None,
        store: Any = None,
        forecaster: Any = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = LineCollector(
            supervisor, line, northbound, constraint, forecaster=forecaster
        )
        self.registry.register(self.collector)
        self.app = make_app()
        self.app.router.add_get("/metrics", self._metrics)
        self.http = Endpoint(
            self.app, host, port, name="metrics", allowed_hosts=line.metrics.allowed_hosts
        )
        self._store = store  # a TraceStore: its figures() are database size and history
        self._db_read_at = -DB_FIGURES_EVERY_S
        self.watch(self.http)

    def watch(self, endpoint: Any) -> None:
        """Export ``endpoint``'s connection counters (``linectl_http_*``) too."""
        self.collector.endpoints.append(endpoint)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._refresh_db()
        # Synchronous on purpose: statistics() is read on the loop's thread, between events.
        return exposition(self.registry, request.headers.get("Accept", ""))

    async def _refresh_db(self) -> None:
        """Database figures at most every DB_FIGURES_EVERY_S: two index lookups, off the loop."""
        now = time.monotonic()
        if self._store is None or now - self._db_read_at < DB_FIGURES_EVERY_S:
            return
        self._db_read_at = now
        try:
            async with asyncio.timeout(2.0):
                self.collector.db = await self._store.figures()
        except (TimeoutError, LinectlError) as exc:
            log.warning("metrics: database figures not read: %s", exc or "timed out")


def exposition(registry: CollectorRegistry, accept: str) -> web.Response:
    """The registry in OpenMetrics (with exemplars) when ``accept`` asks for it, else in the
    classic text format."""
    if OPENMETRICS in accept:
        body, kind = openmetrics.generate_latest(registry), openmetrics.CONTENT_TYPE_LATEST
    else:
        body, kind = generate_latest(registry), CONTENT_TYPE
    return web.Response(body=body, headers={"Content-Type": kind})


async def serve_metrics(
    supervisor: Any,
    line: Line,
    host: str | None = None,
    port: int | None = None,
    *,
    northbound: Any = None,
    constraint: ConstraintMonitor | None = None,
    store: Any = None,
    forecaster: Any = None,
) -> MetricsServer:
    """Start serving ``GET /metrics`` on ``line.metrics`` (or ``host``/``port``; port 0 picks a
    free one, see ``.port``). ``await server.stop()`` ends it."""
    server = MetricsServer(
        supervisor,
        line,
        line.metrics.host if host is None else host,
        line.metrics.port if port is None else port,
        northbound,
        constraint,
        store,
        forecaster=forecaster,
    )
    await server.start()
    return server
