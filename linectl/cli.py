"""The ``linectl`` command. Each subcommand is a thin shell over a module that does the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from linectl.config import json_schema, load_config
from linectl.errors import ConfigError, LinectlError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run, analyse and measure manufacturing lines of station PLCs.",
)

ConfigArg = Annotated[Path, typer.Argument(help="Line config (YAML).", show_default=False)]


def _fail(exc: LinectlError) -> None:
    typer.echo(str(exc), err=True)
    raise typer.Exit(2)


@app.command()
def check(config: ConfigArg) -> None:
    """Validate a line config; print one line per problem, each naming where it is."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(exc)
    typer.echo(
        f"{config}: ok: line '{cfg.line}', {len(cfg.plcs)} PLCs, {len(cfg.stations)} stations"
    )


@app.command()
def schema() -> None:
    """Print the JSON Schema of a line config (for editor completion)."""
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
