"""The virtual-time commands, ``linectl simulate`` and ``linectl replay``; cli.py registers them.

Thin shells: arguments are checked here (one line per problem, exit status 2), the work is in
linectl/simulate.py and linectl/replay.py.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

Configs = Annotated[list[Path], typer.Argument(help="Line configs (YAML).", show_default=False)]


def _problems(problems: list[str], prefix: str) -> None:
    """Print each problem on one line and exit 2, if there are any."""
    for problem in problems:
        typer.echo(f"{prefix}: {problem}", err=True)
    if problems:
        raise typer.Exit(2)


def _table(title: str, columns: list[tuple[str, str]], rows: list[tuple[str, list[str]]]) -> None:
    from rich.table import Table

    from linectl.cli import _console

    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for head, sub in columns:
        table.add_column(f"{head}\n{sub}", justify="right")
    for label, cells in rows:
        table.add_row(label, *cells)
    _console().print(table)


def _json(data: list[dict[str, Any]]) -> None:
    json.dump(data[0] if len(data) == 1 else data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _quiet() -> None:
    # A simulation's faults and quarantines are its figures, not news: keep errors only.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    logging.getLogger("linectl").setLevel(logging.ERROR)


def simulate_command(
    configs: Configs,
    units: Annotated[
        int | None,
        typer.Option(help="Units to release into each line (default 100).", show_default=False),
    ] = None,
    hours: Annotated[
        float | None,
        typer.Option(help="Run each line this many hours of line time.", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first replication.")] = 1,
    replications: Annotated[
        int, typer.Option(help="Runs per line, seeds SEED, SEED+1, ...; figures get a 95 % CI.")
    ] = 1,
    db: Annotated[
        str | None,
        typer.Option(
            help="Record the trace: a fresh database URL, or 'memory' for a throwaway one.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Run each line in virtual time: the real supervisor against in-process PLCs, a shift in
    well under a second. Prints what analyze predicts beside what the runs did (figures:
    docs/simulate.md)."""
    from linectl.config import load_config
    from linectl.errors import ConfigError, LinectlError
    from linectl.simulate import DEFAULT_UNITS, Plan, run, simulate, simulation_rows, unsimulated

    plan = Plan(
        units=units if units is not None or hours is not None else DEFAULT_UNITS,
        hours=hours,
        seed=seed,
        replications=replications,
        db=db,
    )
    _problems(plan.problems(), "linectl simulate")
    lines = []
    problems: list[str] = []
    for config in configs:
        try:
            lines.append((str(config), load_config(config)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    _problems(problems, "linectl simulate")
    for config, line in lines:
        missing = unsimulated(line)
        if missing:
            which = "no station" if len(missing) == len(line.stations) else ", ".join(missing)
            typer.echo(
                f"{config}: {which} has a sim: section; simulated at nominal cycle_s "
                "(no spread, rejects or faults)",
                err=True,
            )
    _quiet()
    try:
        results = run(simulate(lines, plan))
    except* LinectlError as group:
        for exc in group.exceptions:
            typer.echo(f"linectl simulate: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        _json([r.to_dict() for r in results])
        return
    what = f"{plan.units:,} units" if plan.units is not None else f"{plan.hours:g} h"
    runs = f", {plan.replications} runs each (mean ± 95 % CI)" if plan.replications > 1 else ""
    _table(
        f"Predicted and simulated, {what}{runs} (line seconds, virtual time)",
        [
            (head, sub)
            for config, r in zip(configs, results, strict=True)
            for head, sub in ((r.line.line, "predicted"), (config.name, "simulated"))
        ],
        simulation_rows(results),
    )


def replay_command(
    config: Annotated[Path, typer.Argument(help="The recorded line's config.", show_default=False)],
    flow: Annotated[
        Path | None,
        typer.Option(help="Config to replay under (default: CONFIG itself).", show_default=False),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(help="Trace database URL (default: the config's).", show_default=False),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Units released at or after (ISO 8601; UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Units released before (ISO 8601).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for cycles beyond the recording.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Replay a recorded run (each station's cycle times, rejects and faults from the trace)
    under another flow or policy, in virtual time; recorded and replayed figures side by side."""
    from linectl.cli import _fail, _iso, _load, _with_store
    from linectl.errors import LinectlError
    from linectl.replay import MAX_UNITS, ReplayError, replay, replay_rows
    from linectl.simulate import run

    recorded_line = _load(config)
    other = _load(flow) if flow is not None else recorded_line
    start, end = _iso(since, "--since"), _iso(until, "--until")

    async def read(store: Any) -> Any:
        return await store.units(None, start, end, None, MAX_UNITS + 1)

    units = _with_store(config, db, read)
    window = f"{since or 'the start'} to {until or 'the end'}"
    if not any(u.steps for u in units):
        typer.echo(
            f"linectl replay: no steps of line '{recorded_line.line}' recorded from {window}",
            err=True,
        )
        raise typer.Exit(2)
    _quiet()
    try:
        result = run(replay(recorded_line, units, other, seed))
    except ReplayError as exc:
        typer.echo(f"linectl replay: {exc}", err=True)
        raise typer.Exit(2) from None
    except LinectlError as exc:
        _fail(exc)
    for note in result.notes:
        typer.echo(f"{flow or config}: {note}", err=True)
    if as_json:
        _json([result.to_dict()])
        return
    names = list(dict.fromkeys([*recorded_line.stations, *other.stations]))
    _table(
        f"{result.units:,} units released {window}: recorded, and replayed in virtual time "
        "(line seconds)",
        [(config.name, "recorded"), ((flow or config).name, "replayed")],
        replay_rows(result, names),
    )
