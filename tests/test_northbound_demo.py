"""config/demo-northbound.yaml: `linectl demo` publishes the demo line over MQTT (unified
namespace and Sparkplug B on the machine's broker) and serves it over OPC UA, in one command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
from pathlib import Path

import pytest
from asyncua import Client

from linectl.northbound.sparkplug import decode
from tests.helpers import eventually, interrupt, read_line_with, reap, start_linectl
from tests.mosquitto import Recorder, unique
from tests.test_demo import free_ports
from tests.test_northbound_docs import shell_commands


def demo_config(tmp_path: Path) -> tuple[Path, str, str]:
    """config/demo-northbound.yaml on free ports, topics no other run uses, ten times faster."""
    text = Path("config/demo-northbound.yaml").read_text()
    modbus, opcua, metrics, api, server = free_ports(5)
    prefix, group = f"acme/{unique('dd')}/assembly", unique("linectl")
    for old, new in (
        ("port: 15022", f"port: {modbus}"),
        ("opc.tcp://127.0.0.1:14841", f"opc.tcp://127.0.0.1:{opcua}"),
        ("port: 9474", f"port: {metrics}"),
        ("port: 9475", f"port: {api}"),
        ("port: 4841", f"port: {server}"),
        ("topic_prefix: acme/dresden/assembly", f"topic_prefix: {prefix}"),
        ("group_id: linectl", f"group_id: {group}"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    text = re.sub(r"(?m)^time_scale: .*$", "time_scale: 0.01", text)
    path = tmp_path / "demo-northbound.yaml"
    path.write_text(text)
    return path, prefix, group


@pytest.mark.slow
async def test_demo_northbound_publishes_over_mqtt_and_serves_opc_ua(tmp_path):
    """The README's and docs' commands: the demo, and mosquitto_sub watching it."""
    config, prefix, group = demo_config(tmp_path)
    watch = next(c for c in shell_commands() if c.startswith("mosquitto_sub"))
    watcher = await asyncio.create_subprocess_exec(
        *shlex.split(watch), stdout=asyncio.subprocess.PIPE
    )
    rec = Recorder()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(reap, watcher)
        await stack.enter_async_context(rec.listening([f"{prefix}/#", f"spBv1.0/{group}/#"]))
        proc = await start_linectl("demo", str(config), cwd=tmp_path)
        try:
            line = await read_line_with(proc.stdout, "opc ua server", within=30)
            url = re.search(r"opc ua server (opc\.tcp://\S+?)[;\s]", line).group(1)
            base = f"{prefix}/demo_nb"

            def finished() -> int:
                found = [json.loads(p)["finished"] for t, p in rec.on(f"{base}/line")]
                return found[-1] if found else 0

            await eventually(lambda: finished() >= 2, within=30, what="2 units on MQTT")
            births = [t for t, _ in rec.on(f"spBv1.0/{group}/") if "BIRTH" in t]
            assert births[0] == f"spBv1.0/{group}/NBIRTH/demo_nb"
            assert len(births) == 1 + 7  # a DBIRTH per station

            async def read_finished() -> int:
                try:
                    async with Client(url, timeout=10) as client:
                        ns = await client.get_namespace_index("urn:linectl:northbound")
                        line = [f"{ns}:Line", f"{ns}:Finished"]
                        return await (await client.nodes.objects.get_child(line)).read_value()
                except OSError:  # still starting: asyncua builds its address space first
                    return 0

            await eventually(read_finished, within=30, interval=0.5, what="Finished over OPC UA")
            await interrupt(proc, within=30)
        finally:
            await reap(proc)
        await eventually(lambda: rec.on(f"spBv1.0/{group}/NDEATH/"), what="NDEATH on stop")
        watcher.terminate()
        watched = (await watcher.communicate())[0].decode(errors="replace")
        assert f"\n{prefix}/demo_nb/line {{" in watched  # topic, space, JSON: as docs show
        assert f"spBv1.0/{group}/NBIRTH/demo_nb " in watched
        death = decode(rec.on(f"spBv1.0/{group}/NDEATH/")[0][1])
        assert [m.name for m in death.metrics] == ["bdSeq"]
        assert json.loads(rec.on(f"{base}/status")[-1][1]) == {"online": False}
        assert (tmp_path / "demo_nb.spool").is_dir()  # store and forward, beside the trace db
        await rec.clear_retained(prefix)
