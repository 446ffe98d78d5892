"""The ``linectl`` command. Each subcommand is a thin shell over a module that does the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from linectl.analysis import analyze as analyze_line
from linectl.analysis import comparison_rows
from linectl.config import Line, json_schema, load_config
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
def analyze(
    configs: Annotated[list[Path], typer.Argument(help="Line configs (YAML).", show_default=False)],
    units: Annotated[int, typer.Option(min=1, help="Units released at time 0.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Predict interval, throughput, lead time and bottleneck; several configs side by side."""
    from rich.console import Console
    from rich.table import Table

    lines: list[Line] = []
    problems: list[str] = []
    for config in configs:
        try:
            lines.append(load_config(config))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        _fail(ConfigError(problems))
    results = [analyze_line(line, units) for line in lines]
    if as_json:
        data = [r.to_dict() for r in results]
        json.dump(data[0] if len(data) == 1 else data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table(title="Flow analysis (nominal cycle times)")
    table.add_column("", no_wrap=True)
    for config, result in zip(configs, results, strict=True):
        table.add_column(f"{result.line}\n{config.name}", justify="right", overflow="fold")
    for label, cells in comparison_rows(results):
        table.add_row(label, *cells)
    Console().print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of a line config (for editor completion)."""
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
