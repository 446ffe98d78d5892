"""The ``linectl`` command. Each subcommand is a thin shell over a module that does the work."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO

import typer

from linectl import aio
from linectl.analysis import analyze as analyze_line
from linectl.analysis import comparison_rows
from linectl.config import Line, json_schema, load_config
from linectl.errors import ConfigError, LeaseLost, LinectlError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run, analyse and measure manufacturing lines of station PLCs.",
)

ConfigArg = Annotated[Path, typer.Argument(help="Line config (YAML).", show_default=False)]
MigrateOption = Annotated[
    list[str] | None,
    typer.Option(
        "--migrate",
        help="OLD=NEW: units' steps at station OLD count as at NEW; OLD=: quarantine them "
        "(repeatable; docs/service.md).",
        show_default=False,
    ),
]


def _fail(exc: LinectlError) -> NoReturn:
    typer.echo(str(exc), err=True)
    raise typer.Exit(2)


def _load(config: Path) -> Line:
    """The line config, or its problems on stderr and exit status 2."""
    try:
        return load_config(config)
    except ConfigError as exc:
        _fail(exc)


@app.command()
def check(
    config: ConfigArg,
    against_db: Annotated[
        str | None,
        typer.Option(
            "--against-db",
            help="Also check the units in this store fit the config (URL).",
            show_default=False,
        ),
    ] = None,
    migrate: MigrateOption = None,
) -> None:
    """Validate a line config; print one line per problem, each naming where it is."""
    cfg = _load(config)
    if against_db is not None:
        from linectl.service_cli import check_against_db

        check_against_db(config, cfg, against_db, migrate or [])
    typer.echo(
        f"{config}: ok: line '{cfg.line}', {len(cfg.plcs)} PLCs, {len(cfg.stations)} stations"
    )
    for name, plc in cfg.plcs.items():
        section = "security" if plc.protocol == "opcua" else "tls"
        if getattr(plc, section, None) is None:
            typer.echo(
                f"{config}: warning: plcs.{name} ({plc.where}) has no {section} section: "
                "anyone on its network can read and command it (docs/security.md)",
                err=True,
            )
    northbound = cfg.northbound.opcua if cfg.northbound is not None else None
    if northbound is not None and northbound.allow_anonymous:
        typer.echo(
            f"{config}: warning: northbound.opcua.allow_anonymous: anyone on "
            f"{northbound.host} reads the line unencrypted, without login (docs/northbound.md)",
            err=True,
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


@app.command("compare")
def compare_command(
    configs: Annotated[list[Path], typer.Argument(help="Line configs (YAML).", show_default=False)],
    units: Annotated[int, typer.Option(min=4, help="Units to run through each line.")] = 100,
    time_scale: Annotated[
        float | None,
        typer.Option(
            help="Wall seconds per config second (default: each config's).", show_default=False
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw units finished over time to this PNG.")
    ] = None,
) -> None:
    """Run each line against its simulators and show predicted and measured figures side by
    side (definitions: docs/performance.md). The lines run at once, each on a throwaway SQLite
    trace store."""
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from linectl import compare as cmp

    if time_scale is not None and time_scale <= 0:
        raise typer.BadParameter(f"must be above 0, not {time_scale}", param_hint="--time-scale")
    lines: list[tuple[str, Line]] = []
    problems: list[str] = []
    for config in configs:
        try:
            lines.append((str(config), cmp.with_units(load_config(config), units, time_scale)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        _fail(ConfigError(problems))
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            typer.echo("--plot needs matplotlib: pip install -e '.[plot]'", err=True)
            raise typer.Exit(2) from None
    _logging(False, board=True)
    logging.getLogger().setLevel(logging.WARNING)
    err = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        bars = [progress.add_task(line.line, total=units) for _, line in lines]
        try:
            results = aio.run(
                cmp.compare(
                    lines, on_progress=lambda i, done: progress.update(bars[i], completed=done)
                )
            )
        except* (LinectlError, TimeoutError, RuntimeError, OSError) as group:
            for exc in group.exceptions:
                typer.echo(f"linectl compare: {exc}", err=True)
            raise typer.Exit(1) from None
    if plot is not None:
        cmp.plot(results, plot)
        typer.echo(f"{plot}: units finished over time", err=True)
    if as_json:
        data = [r.to_dict() for r in results]
        json.dump(data[0] if len(data) == 1 else data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table(title=f"Predicted and measured, {units} units (config seconds)")
    table.add_column("", no_wrap=True)
    for config, r in zip(configs, results, strict=True):
        table.add_column(f"{r.line.line}\npredicted", justify="right")
        table.add_column(f"{config.name}\nmeasured", justify="right")
    for label, cells in cmp.comparison_rows(results):
        table.add_row(label, *cells)
    _console().print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of a line config (for editor completion)."""
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- Trace store queries ---------------------------------------------------------------------

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="Database URL; overrides the config's storage.url.", show_default=False
    ),
]


class ExportFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


def _iso(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time from the command line; one without a zone is taken as UTC."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"'{value}' is not an ISO 8601 time", param_hint=option) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _with_store(config: Path, db: str | None, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``work(store)`` on the line's trace store, opened for reading only."""
    from linectl.store import TraceStore

    cfg = _load(config)

    async def run() -> Any:
        async with await TraceStore.open(db or cfg.storage_url, cfg.line, create=False) as store:
            return await work(store)

    try:
        return aio.run(run())
    except LinectlError as exc:
        _fail(exc)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _console() -> Any:
    from rich.console import Console

    # Piped into a file, rich would squeeze tables to 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


@app.command("units")
def units_command(
    config: ConfigArg,
    status: Annotated[
        str | None, typer.Option(help="in_line, finished or quarantined.", show_default=False)
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Released at or after (ISO 8601; UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Released before (ISO 8601).")] = None,
    station: Annotated[
        str | None, typer.Option(help="Only units that went through this station.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Show at most this many.")] = None,
    db: DbOption = None,
) -> None:
    """List the units of a line recorded in its trace store, oldest first."""
    from rich.table import Table

    start, end = _iso(since, "--since"), _iso(until, "--until")

    async def query(store: Any) -> Any:
        try:
            return await store.units(status, start, end, station, limit)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--status") from None

    found = _with_store(config, db, query)
    table = Table(title=f"{len(found)} unit(s)")
    for column in ("Serial", "Status", "Released", "Finished", "Steps", "Last step", "Branch"):
        table.add_column(column, no_wrap=column != "Branch")
    table.add_column("Quarantine reason")
    for unit in found:
        last = unit.steps[-1] if unit.steps else None
        table.add_row(
            unit.serial,
            unit.status,
            _when(unit.released_at),
            _when(unit.finished_at),
            str(len(unit.steps)),
            "" if last is None else f"{last.station} #{last.attempt}: {last.result or last.status}",
            unit.branch or "",
            unit.reason or "" if unit.status == "quarantined" else "",
        )
    _console().print(table)


@app.command("trace")
def trace_command(
    config: ConfigArg,
    serial: Annotated[str, typer.Argument(help="Serial of the unit.", show_default=False)],
    db: DbOption = None,
) -> None:
    """Show one unit's whole history: release, every step at every station, quarantine, finish."""
    from rich.table import Table

    async def query(store: Any) -> Any:
        return await store.trace(serial)

    trace = _with_store(config, db, query)
    unit = trace.unit
    console = _console()
    console.print(
        f"[bold]{unit.serial}[/bold]  line {unit.line}, unit {unit.unit_id}: {unit.status}"
    )
    console.print(f"released  {_when(unit.released_at)}")
    if unit.branch:
        console.print(f"branches  {unit.branch}")
    steps = Table(title="Steps")
    for column in ("Station", "Slot", "Attempt", "Seq", "Commanded", "Accepted", "Finished"):
        steps.add_column(column, no_wrap=True)
    for column in ("Duration s", "Result", "Fault", "PLC cycle s"):
        steps.add_column(column, no_wrap=True, justify="right")
    for step in trace.steps:
        steps.add_row(
            step.station,
            str(step.slot),
            str(step.attempt),
            str(step.seq),
            _when(step.commanded_at),
            _when(step.accepted_at),
            _when(step.finished_at),
            _seconds(step.duration_s),
            step.result or step.status,
            str(step.fault_code) if step.fault_code else "",
            _seconds(step.plc_cycle_s),
        )
    console.print(steps)
    for entry in trace.quarantines:
        back = f", released {_when(entry.released_at)}" if entry.released_at else ", still held"
        console.print(f"quarantined  {_when(entry.at)}: {entry.reason}{back}")
    if unit.finished_at is not None:
        console.print(f"finished  {_when(unit.finished_at)}")


@app.command("actions")
def actions_command(
    config: ConfigArg,
    db: DbOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the newest N actions.")] = 50,
) -> None:
    """Show the operator's actions on the line (pause, resume, drains, releases), oldest first."""

    async def query(store: Any) -> Any:
        return await store.operator_actions(limit=limit)

    console = _console()
    for entry in _with_store(config, db, query):
        target = f" {entry.target}" if entry.target else ""
        detail = f"  ({entry.detail})" if entry.detail else ""
        console.print(f"{_when(entry.at)}  {entry.action}{target}{detail}", highlight=False)


@app.command("export")
def export_command(
    config: ConfigArg,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="csv or jsonl.")] = ExportFormat.csv,
    output: Annotated[
        Path | None, typer.Option(help="Write here instead of stdout.", show_default=False)
    ] = None,
    db: DbOption = None,
) -> None:
    """Export every step joined with its unit, one row per step, for a spreadsheet."""
    from linectl.store.export import ExportWriter

    async def export(store: Any, out: TextIO) -> int:
        writer = ExportWriter(out, fmt.value)
        async for page in store.export():
            writer.write(page)
        return writer.rows

    if output is None:
        _with_store(config, db, lambda store: export(store, sys.stdout))
        return
    try:
        out = output.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot write {output}: {exc.strerror}", param_hint="--output"
        ) from None
    with out:
        rows = _with_store(config, db, lambda store: export(store, out))
    typer.echo(f"{output}: {rows} step(s)", err=True)


@app.command("sim")
def sim_command(
    config: ConfigArg,
    control_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port of the HTTP control interface; 0 = free.")
    ] = 0,
    free_ports: Annotated[
        bool, typer.Option(help="Listen on free ports instead of the config's; print them.")
    ] = False,
) -> None:
    """Run every PLC of a line config as a simulator until Ctrl-C or SIGTERM.

    Prints where each PLC listens and the control URL (docs/simulators.md), then 'ready'.
    """
    from simulators.control import serve

    try:
        cfg = load_config(config)
        aio.run(serve(cfg, control_port=control_port, free_ports=free_ports, announce=typer.echo))
    except ConfigError as exc:
        _fail(exc)
    except OSError as exc:  # a port already taken, named by the server that wanted it
        typer.echo(f"{config}: {exc}", err=True)
        raise typer.Exit(1) from None


class LogFormat(StrEnum):
    human = "human"
    json = "json"


LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format", help="human (for a terminal) or json (one object per line, for journald)."
    ),
]


def _logging(
    verbose: bool, board: bool = False, fmt: LogFormat = LogFormat.human, line: str | None = None
) -> None:
    import logging

    if fmt is LogFormat.json:
        from linectl.logformat import JsonFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(line))
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    elif board:
        # Through rich's console, so log lines print above the live board, not through it.
        from rich.logging import RichHandler

        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(name)s: %(message)s",
            handlers=[RichHandler(show_path=False)],
        )
    else:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        )
    # asyncua and pymodbus narrate every reconnect; our drivers log transitions once.
    for noisy in ("asyncua", "pymodbus"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)
    # SQLAlchemy's pool logs a traceback for a connection that died (the database restarted,
    # a standby ended a replaced owner's sessions); the store says what that means in one line.
    if not verbose:
        logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)


@app.command("run")
def run_command(
    config: ConfigArg,
    db: Annotated[str | None, typer.Option(help="Database URL (default: the config's).")] = None,
    status: Annotated[bool, typer.Option(help="Show the live status board.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    log_format: LogFormatOption = LogFormat.human,
    migrate: MigrateOption = None,
    standby: Annotated[
        bool, typer.Option(help="Wait for the line's owner to stop or fail, then take over.")
    ] = False,
    lease_s: Annotated[
        float, typer.Option(min=0.5, max=60, help="Lease time: how soon a standby takes over.")
    ] = 3.0,
) -> None:
    """Run the supervisor against the PLCs in CONFIG until Ctrl-C or SIGTERM."""

    from linectl.app import run_line
    from linectl.configcheck import parse_migrations
    from linectl.status import live_status

    line = _load(config)
    try:
        mapping = parse_migrations(migrate or [])
    except ConfigError as exc:
        _fail(exc)
    _logging(verbose, board=status, fmt=log_format, line=line.line)

    def ready(_sup, where: list[str]) -> None:
        typer.echo(f"linectl: running line '{line.line}'; " + "; ".join(where), err=True)

    try:
        aio.run(
            run_line(
                line,
                db_url=db,
                on_ready=ready,
                status=live_status if status else None,
                exit_when_done=line.release.count is not None,
                migrate=mapping,
                source=str(config),
                standby=standby,
                lease_s=lease_s,
            )
        )
    except LeaseLost as exc:
        typer.echo(str(exc), err=True)
        sys.stderr.flush()
        # Fail-stop: a thread may still hang on a database that stopped answering, and a
        # process that lost its line must end now rather than wait for it at exit.
        os._exit(2)
    except LinectlError as exc:
        _fail(exc)
    except OSError as exc:  # a port already taken, named by the endpoint that wanted it
        typer.echo(f"linectl run: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command("demo")
def demo_command(
    config: Annotated[Path, typer.Argument(help="Line config.")] = Path("config/demo.yaml"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    log_format: LogFormatOption = LogFormat.human,
) -> None:
    """Simulated PLCs, supervisor and metrics in one command, with a live status board."""
    import logging

    from linectl.app import demo_db, run_line
    from linectl.status import live_status
    from simulators.runner import SimLine

    line = _load(config)
    _logging(verbose, board=True, fmt=log_format, line=line.line)
    if not verbose:  # the board is the output; keep warnings, drop the chatter
        logging.getLogger().setLevel(logging.WARNING)

    async def demo() -> None:
        async with SimLine(line) as sim:

            def ready(_sup, where: list[str]) -> None:
                typer.echo("linectl demo: " + "; ".join(where) + f"; trace db {demo_db(line)}")

            await run_line(sim.line, db_url=demo_db(line), on_ready=ready, status=live_status)

    try:
        aio.run(demo())
    except LinectlError as exc:
        _fail(exc)
    except OSError as exc:
        typer.echo(f"linectl demo: {exc}", err=True)
        raise typer.Exit(1) from exc


CTL_ACTIONS = {
    "status": ("GET", "/status", None),
    "quarantine": ("GET", "/quarantine", None),
    "pause": ("POST", "/pause", None),
    "resume": ("POST", "/resume", None),
    "drain": ("POST", "/station", lambda a: {"station": a, "in_service": False}),
    "restore": ("POST", "/station", lambda a: {"station": a, "in_service": True}),
    "drain-branch": ("POST", "/branch", lambda a: {"station": a, "in_service": False}),
    "restore-branch": ("POST", "/branch", lambda a: {"station": a, "in_service": True}),
    "release": ("POST", "/release", lambda a: {"serial": a}),
    "forecast": ("POST", "/forecast", lambda a: {"until": a}),
}


@app.command("ctl")
def ctl_command(
    config: ConfigArg,
    action: Annotated[str, typer.Argument(help=" | ".join(CTL_ACTIONS))],
    target: Annotated[str | None, typer.Argument(help="Station or unit serial.")] = None,
    until: Annotated[
        str | None,
        typer.Option(help="forecast: units done by HH:MM (or ISO time).", show_default=False),
    ] = None,
    replications: Annotated[
        int | None, typer.Option(help="forecast: virtual runs (default 10).", show_default=False)
    ] = None,
) -> None:
    """Steer a running supervisor through its operator API: drain, pause, release units; or
    forecast the units finished by a time (docs/simulate.md)."""
    import os
    import urllib.error
    import urllib.request

    from linectl.api import TOKEN_ENV

    line = _load(config)
    if action not in CTL_ACTIONS:
        typer.echo(f"unknown action '{action}'; use one of: {', '.join(CTL_ACTIONS)}", err=True)
        raise typer.Exit(2)
    method, path, body_of = CTL_ACTIONS[action]
    if action == "forecast":
        target = until
        if not until:
            typer.echo("'forecast' needs --until HH:MM", err=True)
            raise typer.Exit(2)
    if body_of is not None and not target:
        typer.echo(f"'{action}' needs a station or serial", err=True)
        raise typer.Exit(2)
    url = f"http://{line.api.host}:{line.api.port}{path}"
    body = body_of(target) if body_of else None
    if body is not None and replications is not None:
        body["replications"] = replications
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if os.environ.get(TOKEN_ENV):
        request.add_header("Authorization", f"Bearer {os.environ[TOKEN_ENV]}")
    try:
        # A forecast runs its virtual replications before it answers (at most its deadline).
        with urllib.request.urlopen(request, timeout=130 if action == "forecast" else 5) as reply:
            typer.echo(reply.read().decode().rstrip())
    except urllib.error.HTTPError as exc:
        typer.echo(f"{url}: {exc.code}: {exc.read().decode().strip()}", err=True)
        raise typer.Exit(1) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        typer.echo(f"{url}: no supervisor answering ({reason}); is `linectl run` going?", err=True)
        raise typer.Exit(1) from exc


@app.command("certs")
def certs_command(
    name: Annotated[str, typer.Argument(help="File name and common name of the certificate.")],
    uri: Annotated[
        str, typer.Option("--uri", help="Application URI (the config's application_uri).")
    ],
    dns: Annotated[
        list[str] | None, typer.Option("--dns", help="Host name (repeatable; default: this host).")
    ] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="IP address (repeatable).")] = None,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Validity in days.")] = 365,
    key_size: Annotated[int, typer.Option(min=2048, max=4096, help="RSA key bits.")] = 2048,
    out: Annotated[Path, typer.Option(help="Directory to write into.")] = Path("pki"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing certificate and key.")] = False,
) -> None:
    """Make a self-signed OPC UA application instance certificate and its key.

    Writes OUT/NAME.der (give it to the PLC's trust list) and OUT/NAME.key.pem (mode 0600; it
    never leaves this machine). See docs/security.md for rotating them.
    """
    import ipaddress
    import socket

    from linectl.security import fingerprint, generate_certificate, write_certificate

    for address in ip or []:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise typer.BadParameter(
                f"'{address}' is not an IP address", param_hint="--ip"
            ) from None
    if ":" not in uri:
        raise typer.BadParameter(f"'{uri}' is not a URI (like urn:example.com:linectl)", "--uri")
    cert, key = generate_certificate(
        name, uri, dns=dns or [socket.gethostname()], ips=ip or [], days=days, key_size=key_size
    )
    try:
        files = write_certificate(out, name, cert, key, overwrite=force)
    except OSError as exc:
        typer.echo(f"linectl certs: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{files.certificate}: certificate {cert.subject.rfc4514_string()}")
    typer.echo(f"  SHA-256 {fingerprint(cert)}")
    typer.echo(
        f"  valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
    )
    typer.echo(f"{files.private_key}: private key (keep it here; mode 0600)")


# Virtual time (linectl/simcli.py): what-ifs run by the real supervisor in simulated time.
from linectl import simcli  # noqa: E402

app.command("simulate")(simcli.simulate_command)
app.command("replay")(simcli.replay_command)
from linectl import service_cli  # noqa: E402 - its commands need the helpers above

app.command(
    "prune", help="Remove finished units' old steps in short batches, while the line runs."
)(service_cli.prune_command)
app.command(
    "doctor", help="Check PLCs, certificates, database, ports and clock; exit by the worst."
)(service_cli.doctor_command)
app.command("backup", help="Copy a live SQLite trace store consistently (PostgreSQL: pg_dump).")(
    service_cli.backup_command
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
