"""The line over MQTT, against real Mosquitto: the unified namespace (JSON, retained state),
Sparkplug B (births, DDATA, sequence numbers, NDEATH), store and forward across a broker
restart, and a broker that refuses us, none of which may stop the line."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from linectl.config import parse_config
from linectl.metrics import serve_metrics
from linectl.northbound import Northbound
from linectl.northbound.sparkplug import REBIRTH, decode, payload, value_of
from tests.helpers import eventually
from tests.linefixtures import running_line
from tests.mosquitto import Recorder, private_broker, unique

LINE = """\
line: {name}
time_scale: 0.02
release: {{count: {count}}}
plcs:
  p0: {{protocol: modbus, host: 127.0.0.1, port: 0, poll_interval_s: 0.005}}
stations:
  a: {{plc: p0, address: 0, cycle_s: 1}}
  b: {{plc: p0, address: 40, cycle_s: 1, sim: {{reject_p: 0.2, seed: 3}}}}
flow: [a, b]
northbound:
  mqtt:
    port: {port}
    backoff_initial_s: {backoff}
    backoff_max_s: {backoff}
    uns: {{topic_prefix: {prefix}}}
    sparkplug: {{group_id: {group}}}
    spool: {{dir: {spool}}}
"""


def line_config(tmp_path: Path, *, port: int = 1883, count: int = 12, backoff: float = 0.2):
    prefix, group = f"test/{unique('site')}/area", unique("g")
    text = LINE.format(
        name="nb",
        count=count,
        port=port,
        backoff=backoff,
        prefix=prefix,
        group=group,
        spool=tmp_path / "spool",
    )
    return parse_config(text), prefix, group


@contextlib.asynccontextmanager
async def northbound(sup, line) -> AsyncIterator[Northbound]:
    nb = Northbound(sup, line)
    await nb.start()
    try:
        yield nb
    finally:
        await nb.stop()


async def scrape(sup, nb) -> str:
    """GET /metrics of a metrics endpoint that knows the northbound parts."""
    server = await serve_metrics(sup, sup.line, "127.0.0.1", 0, northbound=nb)
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        return await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
    finally:
        await server.stop()


def sparkplug(rec: Recorder, group: str, kind: str) -> list[tuple[str, object]]:
    return [(t, decode(p)) for t, p in rec.on(f"spBv1.0/{group}/{kind}/")]


def metrics(payload) -> dict[str, object]:
    return {m.name: value_of(m) for m in payload.metrics}


async def test_uns_and_sparkplug_publish_the_line_as_it_runs(tmp_path):
    line, prefix, group = line_config(tmp_path)
    rec = Recorder()
    async with (
        rec.listening([f"{prefix}/#", f"spBv1.0/{group}/#"]),
        running_line(line) as run,
        northbound(run.sup, run.sup.line) as nb,
    ):
        await run.wait_finished(12)
        base = f"{prefix}/nb"

        def last(topic: str) -> dict | None:
            found = [json.loads(p) for t, p in rec.on(topic) if t == topic]
            return found[-1] if found else None

        await eventually(
            lambda: (last(f"{base}/line") or {}).get("finished", 0) + run.sup.rejected >= 12,
            what="the line's counts on the unified namespace",
        )
        # Births: NBIRTH seq 0 with bdSeq, then a DBIRTH per station, seq counting up.
        nbirth = sparkplug(rec, group, "NBIRTH")
        assert len(nbirth) == 1
        first = nbirth[0][1]
        assert first.seq == 0
        assert metrics(first)["bdSeq"] == 0
        dbirths = sparkplug(rec, group, "DBIRTH")
        assert sorted(t.rsplit("/", 1)[1] for t, _ in dbirths) == ["a", "b"]
        assert [p.seq for _, p in dbirths] == [1, 2]
        # Then DDATA/NDATA, each message's seq one more than the last, wrapping at 256.
        seqs = [decode(p).seq for t, p in rec.on(f"spBv1.0/{group}/") if "DEATH" not in t]
        assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs)), seqs
        ddata = [metrics(p) for t, p in sparkplug(rec, group, "DDATA") if t.endswith("/b")]
        assert any(d.get("Condition") == "working" for d in ddata)
        passed = max(d["Counts/Passed"] for d in ddata if "Counts/Passed" in d)
        assert passed == run.sup.stations["b"].passed
        # The unified namespace: retained state per station, every unit's release and finish.
        assert last(f"{base}/status") == {"online": True}
        state = last(f"{base}/b/state")
        assert state is not None and state["capacity"] == 1
        released = [json.loads(p)["unit_id"] for _, p in rec.on(f"{base}/units/released")]
        assert released == sorted(released) and len(released) == 12
        assert nb.statistics().links[0].connected

        # A late subscriber gets the current values from the retained messages.
        late = Recorder()
        async with late.listening([f"{base}/+/counts"]):
            await eventually(lambda: len(late.messages) == 2, what="retained counts")
        assert all(retain for _, _, retain in late.messages)
        counts = {t.split("/")[-2]: json.loads(p) for t, p, _ in late.messages}
        assert counts["b"]["passed"] == run.sup.stations["b"].passed

    # A clean stop says goodbye: NDEATH with the session's bdSeq, and status offline.
    await eventually(lambda: sparkplug(rec, group, "NDEATH"), what="NDEATH")
    assert metrics(sparkplug(rec, group, "NDEATH")[0][1]) == {"bdSeq": 0}
    assert json.loads(rec.on(f"{prefix}/nb/status")[-1][1]) == {"online": False}
    await rec.clear_retained(prefix)


@pytest.mark.slow
async def test_broker_restart_loses_nothing_and_births_again(tmp_path):
    """Stopped mid-run, events spool to disk; after the restart NBIRTH comes again with the
    next bdSeq and seq 0, then every spooled message in order, Sparkplug data as historical."""
    async with private_broker(tmp_path / "broker") as broker:
        line, prefix, group = line_config(tmp_path, port=broker.port, count=30, backoff=0.3)
        rec = Recorder()
        topics, me = [f"{prefix}/#", f"spBv1.0/{group}/#"], unique("rec")
        async with contextlib.AsyncExitStack() as first:
            # Listening before the first connect (the first births are not retained), and the
            # northbound subscribed to the line's events before its first release.
            await first.enter_async_context(
                rec.listening(topics, broker.port, identifier=me, clean=False)
            )
            run = await first.enter_async_context(running_line(line))
            nb = await first.enter_async_context(northbound(run.sup, run.sup.line))
            uns = next(link for link in nb.links if link.publisher.name == "uns")
            await eventually(lambda: run.sup.released >= 3, what="units released")
            await eventually(lambda: uns.connected, what="connected")
            await broker.stop()
            await eventually(lambda: not uns.connected, what="the link noticing")
            await eventually(lambda: uns.statistics().spool_messages >= 10, what="messages spooled")
            await broker.start()
            async with rec.listening(topics, broker.port, identifier=me, clean=False):
                await run.wait_finished(30)
                await eventually(
                    lambda: (
                        all(link.statistics().queued == 0 for link in nb.links)
                        and all(link.connected for link in nb.links)
                    ),
                    what="spools drained",
                )
                base = f"{prefix}/nb"
                await eventually(
                    lambda: len(rec.on(f"{base}/units/released")) >= 30,
                    what="every release on the namespace",
                )
        released = [json.loads(p)["unit_id"] for _, p in rec.on(f"{base}/units/released")]
        # Nothing lost, in order. At least once, on both legs: a message whose PUBACK was lost
        # with the broker is sent again from the spool, and the restarted broker delivers again
        # what the subscriber had not acknowledged.
        assert list(dict.fromkeys(released)) == list(range(1, 31))
        assert len(released) <= 30 + 5
        nbirths = [metrics(p)["bdSeq"] for _, p in sparkplug(rec, group, "NBIRTH")]
        assert nbirths[:2] == [0, 1]
        second = [p for _, p in sparkplug(rec, group, "NBIRTH")][1]
        assert second.seq == 0
        historical = [
            m for _, p in sparkplug(rec, group, "DDATA") for m in p.metrics if m.is_historical
        ]
        assert historical, "data from the outage is flagged historical"
        assert nb.statistics().links[0].spool_dropped == 0


async def test_a_broker_that_refuses_us_is_one_line_and_the_line_runs_on(tmp_path, caplog):
    async with private_broker(tmp_path / "broker", users={"linectl": "right"}) as broker:
        text = LINE.format(
            name="nb",
            count=4,
            port=broker.port,
            backoff=0.1,
            prefix="test/x",
            group="g",
            spool=tmp_path / "spool",
        ).replace("    port:", "    login: {user: linectl, password_env: NB_TEST_PW}\n    port:")
        line = parse_config(text)
        caplog.set_level(logging.INFO, logger="linectl.northbound")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NB_TEST_PW", "wrong")
            async with running_line(line) as run, northbound(run.sup, run.sup.line) as nb:
                await run.wait_finished(4)
                await eventually(
                    lambda: all(s.connect_failures >= 3 for s in nb.statistics().links),
                    what="several refused connects",
                )
                assert not any(s.connected for s in nb.statistics().links)
                body = await scrape(run.sup, nb)
        # The outage on the metrics.
        assert 'linectl_northbound_mqtt_connected{line="nb",link="uns"} 0.0' in body
        failures = re.search(
            r'linectl_northbound_mqtt_connect_failures_total\{line="nb",link="sparkplug"\} (\S+)',
            body,
        )
        assert failures is not None and float(failures.group(1)) >= 3
        assert 'linectl_northbound_mqtt_spool_max_messages{line="nb",link="uns"} 100000.0' in body
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 2, refusals  # one per link, not one per attempt
        assert "user 'linectl'" in refusals[0]
        assert "northbound.mqtt.login" in refusals[0]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not [e for e in errors if "northbound" in e], errors


async def test_a_rebirth_command_sends_the_births_again_with_seq_zero(tmp_path):
    line, prefix, group = line_config(tmp_path, count=2)
    rec = Recorder()
    async with (
        rec.listening([f"spBv1.0/{group}/#", f"{prefix}/#"]),
        running_line(line) as run,
        northbound(run.sup, run.sup.line),
    ):
        await eventually(lambda: sparkplug(rec, group, "DBIRTH"), what="the first births")
        rebirth = payload({REBIRTH: True}, 0).SerializeToString()
        async with aiomqtt.Client("127.0.0.1", 1883) as host:  # a Sparkplug host application
            await host.publish(f"spBv1.0/{group}/NCMD/nb", rebirth, qos=0)
        await eventually(lambda: len(sparkplug(rec, group, "NBIRTH")) == 2, what="a rebirth")
        first, second = (p for _, p in sparkplug(rec, group, "NBIRTH"))
        assert second.seq == 0
        assert metrics(second)["bdSeq"] == metrics(first)["bdSeq"]  # same session, same will
        await eventually(lambda: len(sparkplug(rec, group, "DBIRTH")) == 4, what="DBIRTHs")
    await rec.clear_retained(prefix)


async def run_over_tls(tmp_path: Path, broker, ca: Path, *, good: bool) -> Recorder:
    """Three units with northbound to the broker's TLS listener, trusting ``ca``; what the
    plain listener saw of them."""
    text = LINE.format(
        name="nb",
        count=3,
        port=broker.tls_port,
        backoff=0.1,
        prefix=f"test/{unique('tls')}",
        group=unique("g"),
        spool=tmp_path / f"spool-{ca.stem}",
    ).replace("    uns:", f"    tls: {{ca: {ca}}}\n    uns:")
    line = parse_config(text)
    released = f"{line.northbound.mqtt.uns.topic_prefix}/nb/units/released"
    rec = Recorder()
    async with (
        rec.listening([released], broker.port),
        running_line(line) as run,
        northbound(run.sup, run.sup.line) as nb,
    ):
        await run.wait_finished(3)
        if good:
            await eventually(lambda: len(rec.on(released)) == 3, what="the releases over TLS")
            assert all(s.connected for s in nb.statistics().links)
        else:
            await eventually(
                lambda: all(s.connect_failures >= 2 for s in nb.statistics().links),
                what="refused handshakes",
            )
            assert not rec.on(released)
    return rec


async def test_tls_to_the_broker_verifies_its_certificate(tmp_path, caplog, pki):
    """Over TLS with the CA that issued the broker's certificate, the line arrives; with a CA
    that did not, one line naming northbound.mqtt.tls, and the line runs on."""
    caplog.set_level(logging.INFO, logger="linectl.northbound")
    server = (pki / "ca.pem", pki / "plc.pem", pki / "plc.key")
    async with private_broker(tmp_path / "broker", tls=server) as broker:
        await run_over_tls(tmp_path, broker, pki / "ca.pem", good=True)
        assert not [r for r in caplog.records if "TLS" in r.getMessage()]
        await run_over_tls(tmp_path, broker, pki / "other.pem", good=False)
    warnings = [r.getMessage() for r in caplog.records if "TLS" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per link, not one per attempt
    assert "certificate verify failed" in warnings[0]
    assert "northbound.mqtt.tls" in warnings[0]
