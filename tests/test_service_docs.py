"""docs/service.md's examples run: every linectl command in it, its JSON log line, its YAML."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import Line, parse_config
from linectl.logformat import FIELDS
from linectl.store import TraceStore

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "service.md").read_text()


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC, re.S)


def test_the_json_log_example_is_one_object_with_the_documented_keys():
    (example,) = blocks("json")
    entry = json.loads(example)
    assert (
        {"ts", "level", "logger", "msg"} <= set(entry) <= {"ts", "level", "logger", "msg", *FIELDS}
    )


def test_the_storage_setting_is_valid_config():
    setting = re.search(r"`(storage: \{url: [^`]+\})`", DOC).group(1)
    text = (ROOT / "config" / "demo.yaml").read_text() + "\n" + setting + "\n"
    assert parse_config(text).storage_url == "sqlite:////var/lib/linectl/demo.sqlite3"
    assert yaml.safe_load(setting)


OLD = datetime.now(UTC) - timedelta(days=100)
DB_IN_DOC = "sqlite:////var/lib/linectl/demo.sqlite3"


async def demo_store(url: str, line: Line) -> None:
    """Old finished units of the demo line, and unit 42 in the line, at press_2."""
    from bench.retention import fill as fill_line

    async with await TraceStore.open(url, line.line) as store:
        await fill_line(store, line, 20, OLD, reject_every=10**9)
        now = datetime.now(UTC)
        await store.unit_released(42, "demo-000042", now)
        await store.step_intended(42, "kitting", 0, 1, 42, now)
        await store.step_finished(42, "kitting", 1, now, "pass")
        await store.step_intended(42, "press_2", 0, 1, 43, now, "flow[1]=1")


def doc_setup(tmp_path: Path) -> dict[str, str]:
    """The doc's paths and URL mapped onto temporary ones; the store filled."""
    db = tmp_path / "demo.sqlite3"
    url = f"sqlite:///{db}"
    demo = (ROOT / "config" / "demo.yaml").read_text() + f"\nstorage: {{url: '{url}'}}\n"
    config = tmp_path / "demo.yaml"
    config.write_text(demo)
    new = tmp_path / "demo-new.yaml"
    new.write_text(demo.replace("        - [press_2]\n", ""))
    asyncio.run(demo_store(url, parse_config(demo)))
    return {
        "/etc/linectl/demo.yaml": str(config),
        "/etc/linectl/demo-new.yaml": str(new),
        DB_IN_DOC: url,
    }


def test_every_linectl_command_in_the_doc_runs(tmp_path):
    """Paths under /etc and /var become temporary ones; the database is a filled store."""
    mapping = doc_setup(tmp_path)
    commands = [
        line
        for block in blocks("sh")
        for line in block.splitlines()
        if line.startswith("linectl ") and not line.startswith("linectl doctor")
    ]
    assert {shlex.split(c)[1] for c in commands} >= {"prune", "backup", "check"}
    runner = CliRunner()
    for command in commands:
        args = [
            mapping.get(a, str(tmp_path / Path(a).name) if a.startswith("/var/") else a)
            for a in shlex.split(command)[1:]
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (command, result.output)


def test_the_refusal_shown_in_the_doc_is_what_check_prints(tmp_path):
    mapping = doc_setup(tmp_path)
    (shown,) = [b.strip() for b in blocks("text")]
    done = CliRunner().invoke(
        app, ["check", mapping["/etc/linectl/demo-new.yaml"], "--against-db", mapping[DB_IN_DOC]]
    )
    assert done.exit_code == 1
    expected = shown.replace("/etc/linectl/demo.yaml", mapping["/etc/linectl/demo-new.yaml"])
    assert expected in done.output


def test_the_reload_yaml_is_valid_config():
    (snippet,) = blocks("yaml")
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    data.update(yaml.safe_load(snippet))
    line = parse_config(yaml.safe_dump(data))
    assert line.drain == ["press_2"] and line.release.max_wip == 6
