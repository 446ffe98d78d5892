"""Commands for running a line unattended for years: prune, backup, doctor (docs/service.md)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from linectl.errors import LinectlError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str, option: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w`` as a timedelta; a bad one is a clear usage error."""
    match = _DURATION.match(text)
    if match is None:
        raise typer.BadParameter(
            f"'{text}' is not a duration; write a number and s, m, h, d or w, like 90d",
            param_hint=option,
        )
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def prune_command(
    config: Annotated[Path, typer.Argument(help="Line config (YAML).", show_default=False)],
    older_than: Annotated[
        str, typer.Option("--older-than", help="Horizon, like 90d (s, m, h, d, w).")
    ],
    archive: Annotated[
        Path | None,
        typer.Option(help="Append the removed rows to this .jsonl.gz first.", show_default=False),
    ] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="Database URL (default: the config's).")
    ] = None,
) -> None:
    """Remove finished units' steps and station events older than a horizon, in short batches
    that hold the line's writes for a few milliseconds each; safe while the line runs."""
    from linectl.cli import _fail, _load
    from linectl.store.maintenance import prune

    line = _load(config)
    age = parse_duration(older_than, "--older-than")
    if archive is not None and not archive.name.endswith(".gz"):
        raise typer.BadParameter(f"'{archive}' should end in .jsonl.gz", param_hint="--archive")
    horizon = datetime.now(UTC) - age
    try:
        done = prune(db or line.storage_url, line.line, horizon, archive=archive)
    except LinectlError as exc:
        _fail(exc)
    except OSError as exc:
        typer.echo(f"linectl prune: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"pruned line '{line.line}' before {horizon:%Y-%m-%d %H:%M:%S}Z: {done.steps} step(s) "
        f"of {done.units} finished unit(s), {done.events} station event(s) in "
        f"{done.batches} batch(es), {done.seconds:.1f} s ({done.rows_per_s:.0f} rows/s); "
        f"longest batch {done.longest_batch_s * 1000:.1f} ms"
        + (f"; archived to {archive}" if archive is not None else "")
    )


def backup_command(
    config: Annotated[Path, typer.Argument(help="Line config (YAML).", show_default=False)],
    file: Annotated[Path, typer.Argument(help="The copy to write (a new file).")],
    db: Annotated[
        str | None, typer.Option("--db", help="Database URL (default: the config's).")
    ] = None,
) -> None:
    """A consistent copy of the line's SQLite trace store, taken while the line runs.
    For PostgreSQL it prints the pg_dump command that does the same."""
    from linectl.cli import _load
    from linectl.store.maintenance import backup

    line = _load(config)
    try:
        done = backup(db or line.storage_url, file)
    except LinectlError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"linectl backup: {file}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{done.path}: {done.size_bytes} bytes, consistent copy in {done.seconds:.2f} s")


def check_against_db(config: Path, line, url: str, migrate: list[str]) -> None:
    """``linectl check --against-db``: one line per unit the config would strand; exit 1
    unless --migrate resolves every one (nothing is written)."""
    import asyncio

    from linectl.cli import _fail
    from linectl.configcheck import check_units, parse_migrations, refused
    from linectl.store import TraceStore
    from linectl.store.db import mask

    async def units() -> list:
        async with await TraceStore.open(url, line.line, create=False) as store:
            return await store.open_units()

    try:
        mapping = parse_migrations(migrate)
        found = check_units(line, asyncio.run(units()), mapping)
    except LinectlError as exc:
        _fail(exc)
    for unit in found:
        typer.echo(f"{config}: {unit}", err=not unit.resolution)
    bad = refused(found)
    if bad:
        typer.echo(f"{config}: refused: {len(bad)} unit(s) in the line would be stranded", err=True)
        raise typer.Exit(1)
    moved = f", {len(found)} unit(s) migrated by --migrate" if found else ""
    typer.echo(f"{config}: ok against {mask(url)}: the units in the line fit{moved}")


def doctor_command(
    config: Annotated[Path, typer.Argument(help="Line config (YAML).", show_default=False)],
    db: Annotated[
        str | None, typer.Option("--db", help="Database URL (default: the config's).")
    ] = None,
) -> None:
    """Check PLCs, certificates, database, disk, ports and clock; exit 0 ok, 1 warn, 2 fail."""
    import asyncio
    import logging

    from linectl.cli import _load
    from linectl.doctor import examine, exit_code

    line = _load(config)
    # The findings say what went wrong; the drivers' and libraries' own lines would repeat it.
    logging.basicConfig(level=logging.CRITICAL)
    findings = asyncio.run(examine(line, db_url=db))
    for finding in findings:
        typer.echo(str(finding))
    code = exit_code(findings)
    worst = ("all ok", "warnings", "failures")[code]
    typer.echo(f"{config}: {worst} ({len(findings)} checks)")
    raise typer.Exit(code)
