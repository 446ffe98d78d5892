"""linectl.metrics: the exposition a scrape gets, and the OEE arithmetic behind it."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from linectl.analysis import analyze
from linectl.bottleneck import ConstraintMonitor
from linectl.config import parse_config
from linectl.contract import State
from linectl.histogram import Histogram
from linectl.linestate import Condition, StationStatistics, SupervisorStatistics
from linectl.metrics import cumulative_buckets, line_oee, serve_metrics, station_oee
from tests.linefixtures import running_line

LINE = """
line: m
time_scale: 0.01
plcs:
  p: {protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.005}
stations:
  a: {plc: p, address: 0, cycle_s: 1, sim: {reject_p: 0.3, seed: 3}}
  b: {plc: p, address: 40, cycle_s: 2, capacity: 2}
flow: [a, b]
release: {count: 8}
"""
ALLOWED = {"line", "station", "branch", "result"}
DOCS = Path(__file__).parent.parent / "docs" / "metrics.md"


async def scrape(port: int, accept: str = "") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = f"Accept: {accept}\r\n" if accept else ""
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            reply = await reader.read()
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    want = b"application/openmetrics-text" if accept else b"text/plain; version=0.0.4"
    assert b"Content-Type: " + want in head
    return body.decode()


async def test_a_scrape_exposes_the_line_stations_and_plcs_with_only_the_allowed_labels():
    """After a run of 8 units the scrape shows them, labels are line/station/result (plc on the
    PLC metrics only), never a unit serial, and histograms are cumulative up to +Inf."""
    async with running_line(LINE, drain_timeout_s=1.0) as run:
        constraint = ConstraintMonitor(run.sup, window_s=1000)
        constraint.sample()
        await run.wait_finished(8)
        constraint.sample()
        server = await serve_metrics(run.sup, run.sim.line, port=0, constraint=constraint)
        try:
            assert server.host == "127.0.0.1"
            text = await scrape(server.port)
        finally:
            await server.stop()
        stats = run.sup.statistics()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    extra = {
        "linectl_plc_": {"plc"},
        "linectl_line_bottleneck": {"predicted", "shifting"},
        "linectl_http_": {"endpoint", "reason"},
    }
    for family in families.values():
        assert family.name.startswith("linectl_"), family.name
        for sample in family.samples:
            names = set(sample.labels) - {"le", "quantile"}
            allowed = ALLOWED | next(
                (v for k, v in extra.items() if family.name.startswith(k)), set()
            )
            assert names <= allowed, (family.name, sample.labels)
            assert not any("m-0000" in v for v in sample.labels.values()), sample

    # docs/metrics.md's tables name every metric a scrape shows, and no other.
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in families.values()}
    documented = set(re.findall(r"^\| `(linectl_\w+)`", DOCS.read_text(), re.MULTILINE))
    # These need a trace store; tests/test_maintenance.py scrapes them.
    documented -= {"linectl_db_size_bytes", "linectl_db_oldest_step_age_seconds"}
    assert documented == exposed, (documented - exposed, exposed - documented)

    samples = [s for f in families.values() for s in f.samples]

    def value(name: str, **labels: str) -> float:
        want = {"line": "m", **labels}
        (found,) = [s.value for s in samples if s.name == name and s.labels == want]
        return found

    # The parser strips _total from counter family names; samples keep it.
    assert families["linectl_units_finished"].type == "counter"
    finished = value("linectl_units_finished_total")
    quarantined = value("linectl_units_quarantined_total")
    assert finished == stats.finished and finished + quarantined == 8
    assert value("linectl_units_rejected_total") == stats.rejected
    assert value("linectl_wip_units") == 0
    assert value("linectl_station_capacity_units", station="b") == 2
    assert value("linectl_station_ideal_cycle_seconds", station="b") == pytest.approx(1.0)
    assert value("linectl_predicted_interval_seconds") == pytest.approx(1.0)
    assert value("linectl_station_cycles_total", station="a", result="reject") == stats.rejected
    assert value("linectl_station_cycles_total", station="b", result="pass") == finished

    lead = [s for s in families["linectl_unit_lead_time_seconds"].samples]
    buckets = [s for s in lead if s.name.endswith("_bucket")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
    (count,) = [s.value for s in lead if s.name.endswith("_count")]
    assert counts[-1] == count == finished

    for scope, labels in (("line", {}), ("station", {"station": "b"})):
        factors = [
            value(f"linectl_{scope}_{f}_ratio", **labels)
            for f in ("availability", "performance", "quality")
        ]
        oee = value(f"linectl_{scope}_oee_ratio", **labels)
        assert 0 < oee <= 1 and all(0 < f <= 1.2 for f in factors), (scope, factors)
        assert oee == pytest.approx(math.prod(factors))
    assert value("linectl_plc_connected", plc="p") == 1
    assert families["linectl_plc_request_seconds"].type == "summary"
    # a and b have the same nominal rate (a is named on the tie); the measured constraint is
    # one of them, next to the predicted one.
    (info,) = families["linectl_line_bottleneck_info"].samples
    assert info.labels["predicted"] == "a" and info.labels["station"] in ("a", "b")
    assert 0 < value("linectl_station_active_ratio", station=info.labels["station"]) <= 1


async def test_an_openmetrics_scrape_carries_the_unit_serial_as_exemplar():
    """Asked for OpenMetrics, the cycle and lead time buckets carry the serial of the last unit
    observed in them; the serial stays out of the labels."""
    async with running_line(LINE, drain_timeout_s=1.0) as run:
        await run.wait_finished(8)
        server = await serve_metrics(run.sup, run.sim.line, port=0)
        try:
            text = await scrape(server.port, accept="application/openmetrics-text; version=1.0.0")
        finally:
            await server.stop()
        quarantined = {u.serial for u in run.sup.quarantined.values()}
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    for name in ("linectl_unit_lead_time_seconds", "linectl_station_cycle_seconds"):
        exemplars = [s.exemplar for s in families[name].samples if s.exemplar is not None]
        assert exemplars, name
        for ex in exemplars:
            assert re.fullmatch(r"m-\d{6}", ex.labels["serial"]), ex
            assert ex.value > 0
    lead = families["linectl_unit_lead_time_seconds"].samples
    assert not {s.exemplar.labels["serial"] for s in lead if s.exemplar} & quarantined


# --- pure parts ----------------------------------------------------------------------------


def test_buckets_become_cumulative_and_end_in_inf():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    assert cumulative_buckets(h.snapshot()) == [("0.1", 1.0), ("1.0", 3.0), ("+Inf", 4.0)]


def station(seconds: dict[Condition, float], passed: int, rejected: int, **kw) -> StationStatistics:
    full = dict.fromkeys(Condition, 0.0) | seconds
    args = {
        "name": "s",
        "plc": "p",
        "condition": Condition.WORKING,
        "state": State.EXECUTE,
        "seconds": full,
        "utilization": 0.0,
        "busy_seconds": 0.0,
        "cycles": passed + rejected,
        "passed": passed,
        "rejected": rejected,
        "faults": 0,
        "cycle_s": 10.0,
        "ewma_cycle_s": 10.0,
        "capacity": 1,
        "load": 0,
        "connected": True,
        "in_service": True,
        "cycle_seconds": Histogram().snapshot(),
    } | kw
    return StationStatistics(**args)


def test_station_oee_excludes_out_of_service_and_charges_faults_to_availability():
    """100 s in service, 20 s of it faulted or disconnected: availability 0.8. Starved time is
    run time, so 6 units of 1 s ideal in 80 s run: performance 0.075.
    5 of 6 passed: quality 5/6."""
    st = station(
        {
            Condition.WORKING: 6.0,
            Condition.STARVED: 74.0,
            Condition.FAULTED: 15.0,
            Condition.DISCONNECTED: 5.0,
            Condition.OUT_OF_SERVICE: 50.0,
        },
        passed=5,
        rejected=1,
        cycle_s=1.0,
    )
    oee = station_oee(st)
    assert oee.availability == pytest.approx(0.8)
    assert oee.performance == pytest.approx(6 * 1.0 / 80)
    assert oee.quality == pytest.approx(5 / 6)
    assert oee.oee == pytest.approx(5 * 1.0 / 100)  # good units × ideal time / planned time


def test_a_station_that_never_ran_has_oee_zero_not_a_division_error():
    oee = station_oee(station({}, 0, 0))
    assert (oee.availability, oee.performance, oee.quality, oee.oee) == (0, 0, 0, 0)


def test_line_oee_is_finished_units_times_the_predicted_interval_over_time():
    """The line's OEE is measured throughput over predicted throughput: 30 units in 100 s
    against one per 2 s (cycle 2 s; time_scale changes nothing: all in line time) is 0.6."""
    line = parse_config(
        "line: l\ntime_scale: 0.1\nplcs: {p: {protocol: modbus, host: 127.0.0.1, port: 1}}\n"
        "stations: {a: {plc: p, address: 0, cycle_s: 2}}\nflow: [a]\n"
    )
    st = station({Condition.WORKING: 90.0, Condition.FAULTED: 10.0}, 30, 3, cycle_s=2.0)
    hist = Histogram().snapshot()
    stats = SupervisorStatistics(
        "l", 100.0, 33, 30, 3, 3, 0, False, {"a": st}, (), (), (), hist, hist, 3
    )
    oee = line_oee(stats, analyze(line))
    assert oee.availability == pytest.approx(0.9)
    assert oee.performance == pytest.approx(33 * 2.0 / 90)
    assert oee.quality == pytest.approx(30 / 33)
    assert oee.oee == pytest.approx(30 * 2.0 / 100)


async def test_the_endpoints_refusals_are_counted_on_metrics():
    async with running_line(LINE, drain_timeout_s=1.0) as run:
        server = await serve_metrics(run.sup, run.sim.line, port=0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await reader.read()).startswith(b"HTTP/1.1 421")
            writer.close()
            text = await scrape(server.port)
        finally:
            await server.stop()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    labels = (("endpoint", "metrics"), ("line", "m"))
    assert samples[("linectl_http_requests_rejected_total", labels)] == 1
    assert samples[("linectl_http_connections", labels)] == 1  # this scrape
    evicted = (("endpoint", "metrics"), ("line", "m"), ("reason", "evicted"))
    assert samples[("linectl_http_connections_closed_total", evicted)] == 0
