"""Every example in README.md and docs/ is run, so none can rot.

A ``yaml`` block that is a whole line config (it names ``line:`` and ``flow:``) must pass
``linectl check``; any other ``yaml`` block must at least parse. Every ``linectl ...`` command
in a ``sh`` block must name a real command and parse with its options and arguments (files it
names must exist); commands whose effect needs a running line are parsed, not run here: the
tests of each feature run them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from linectl.cli import app
from linectl.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == kind:
                line = text[: match.start()].count("\n") + 1
                found.append((f"{doc.relative_to(ROOT)}:{line}", match.group(2)))
    return found


def commands() -> list[tuple[str, list[str]]]:
    found = []
    for where, body in blocks("sh"):
        for command in body.replace("\\\n", " ").splitlines():
            command = command.split(" #", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", command):
                words = shlex.split(part, comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value before the command
                if words and words[0] in ("linectl", ".venv/bin/linectl"):
                    found.append((where, words[1:]))
    return found


YAML = blocks("yaml")


@pytest.mark.parametrize(("where", "body"), YAML, ids=[where for where, _ in YAML])
def test_every_yaml_example_is_valid(where, body):
    data = yaml.safe_load(body)
    if isinstance(data, dict) and "line" in data and "flow" in data:
        parse_config(body, source=where)


COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


COMMANDS_IN_DOCS = commands()


@pytest.mark.parametrize(
    ("where", "args"),
    COMMANDS_IN_DOCS,
    ids=[f"{where} {' '.join(args)[:50]}" for where, args in COMMANDS_IN_DOCS],
)
def test_every_linectl_command_in_the_docs_parses(where, args, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert args, f"{where}: 'linectl' with no command"
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    assert command is not None, f"{where}: no command 'linectl {name}'"
    if ">" in rest:
        rest = rest[: rest.index(">")]  # a shell redirection
    try:
        command.make_context(name, rest, resilient_parsing=False)
    except Exception as exc:  # typer's own click: its errors have format_message()
        if type(exc).__name__ == "Exit":
            return  # --help and the like
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"{where}: linectl {' '.join(args)}: {message}")


def test_the_docs_do_have_examples():
    assert len(YAML) >= 3 and len(COMMANDS_IN_DOCS) >= 20
