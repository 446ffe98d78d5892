"""docs/service.md's examples run: every linectl command in it, its JSON log line, its YAML."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path

import yaml
from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import parse_config
from linectl.logformat import FIELDS
from tests.test_maintenance import fill

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


def test_every_linectl_command_in_the_doc_runs(tmp_path):
    """Paths under /etc and /var become temporary ones; the database is a filled store."""
    db = tmp_path / "demo.sqlite3"
    asyncio.run(fill(f"sqlite:///{db}"))
    config = tmp_path / "demo.yaml"
    text = (ROOT / "config" / "demo.yaml").read_text().replace("line: demo", "line: ret")
    config.write_text(text + f"\nstorage: {{url: 'sqlite:///{db}'}}\n")
    commands = [
        line for block in blocks("sh") for line in block.splitlines() if line.startswith("linectl ")
    ]
    assert {shlex.split(c)[1] for c in commands} >= {"prune", "backup"}
    runner = CliRunner()
    for command in commands:
        args = shlex.split(command)[1:]
        args = [
            str(config)
            if a == "/etc/linectl/demo.yaml"
            else str(tmp_path / Path(a).name)
            if a.startswith("/var/")
            else a
            for a in args
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (command, result.output)
