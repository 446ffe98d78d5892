"""docs/northbound.md and the README's section say what the code does: every YAML snippet is a
valid northbound section, the error shown is the one linectl prints, the node and topic names
are the ones served. (The commands are run by tests/test_northbound_demo.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from linectl.config import parse_config
from linectl.errors import ConfigError
from linectl.northbound.opcua_server import LINE_TYPES, STATION_TYPES
from linectl.northbound.sparkplug import TYPES

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "northbound.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
BASE = """\
line: t
plcs: {p: {protocol: modbus, host: 127.0.0.1}}
stations: {a: {plc: p, address: 0, cycle_s: 1}}
flow: [a]
"""


def blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of ``text`` whose info string is ``lang``."""
    out: list[str] = []
    current: list[str] | None = None
    want = False
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, want = [], line[3:].strip() == lang
            else:
                if want:
                    out.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return out


def shell_commands() -> list[str]:
    """Every command the docs tell a reader to run (for the demo test to run)."""
    found = blocks(DOC, "sh") + blocks(README[README.index("## Plant integration") :], "sh")
    inline = re.findall(r"`(mosquitto_sub [^`]+)`", README)
    return [c.strip() for c in found + inline]


@pytest.mark.parametrize("snippet", blocks(DOC, "yaml"))
def test_every_yaml_snippet_is_a_valid_northbound_section(snippet):
    line = parse_config(BASE + snippet)
    assert line.northbound is not None


def test_the_error_shown_is_the_one_linectl_prints():
    shown = blocks(DOC, "")[0].strip()
    text = BASE + "northbound:\n  mqtt:\n    uns:\n      topic_prefix: acme/+/x\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "line.yaml")
    expected = re.sub(r"^line\.yaml:\d+: ", "", err.value.problems[0])
    assert re.sub(r"^line\.yaml:\d+: ", "", shown) == expected


def test_the_node_tables_name_the_served_nodes():
    for key in LINE_TYPES:
        assert f"`{key}`" in DOC or f"`Line/{key.split('/')[1]}`" in DOC or key.split("/")[1] in DOC
    for key in STATION_TYPES:
        assert key.split("/")[-1] in DOC, key
    for name in TYPES:
        assert f"`{name}`" in DOC or name.split("/")[-1] in DOC, name


def test_the_commands_are_the_demos():
    commands = shell_commands()
    assert "linectl demo config/demo-northbound.yaml" in commands
    assert "mosquitto_sub -h 127.0.0.1 -t 'acme/#' -t 'spBv1.0/#' -v" in commands


def test_check_says_the_demo_allows_anonymous_readers():
    from typer.testing import CliRunner

    from linectl.cli import app

    result = CliRunner().invoke(app, ["check", "config/demo-northbound.yaml"])
    assert result.exit_code == 0, result.output
    assert "ok: line 'demo_nb'" in result.stdout
    assert (
        "config/demo-northbound.yaml: warning: northbound.opcua.allow_anonymous: anyone on "
        "127.0.0.1 reads the line unencrypted, without login" in result.stderr
    )
