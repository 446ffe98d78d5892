"""``linectl doctor``: is everything a line needs healthy? One line per check, ok/warn/fail.

PLCs are probed with linectl's own drivers, all at once: reachable, every station inside the
contract (version, registers or nodes), heartbeat moving (the connection is held a little
longer than the heartbeat deadline; a frozen heartbeat drops it). Certificates named in the
config are read for validity and days to expiry. The database is opened read-only for its
schema version; its disk's free space is measured. The metrics and operator ports are free or
held by a running linectl. The clock is after the newest release in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from linectl.config import Line, ModbusPlc, OpcUaPlc
from linectl.drivers import make_driver
from linectl.drivers.base import ConnectionChange, DriverEvent, StationViolation
from linectl.errors import LinectlError

LEVELS = ("ok", "warn", "fail")
CERT_WARN_DAYS = 30
DISK_FAIL_BYTES = 100 * 2**20
DISK_WARN_BYTES = 2**30


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # ok, warn or fail
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.subject}: {self.message}"


def exit_code(findings: Iterable[Finding]) -> int:
    """0 when all is ok, 1 for a warning, 2 for a failure: the worst decides."""
    return max((LEVELS.index(f.level) for f in findings), default=0)


# --- PLCs -------------------------------------------------------------------------------------


async def probe_plc(name: str, plc: ModbusPlc | OpcUaPlc, line: Line) -> list[Finding]:
    """Connect with linectl's driver, watch it past the heartbeat deadline, report."""
    subject = f"plc {name} ({plc.where})"
    stations = {n: s for n, s in line.stations.items() if s.plc == name}
    violations: list[str] = []
    lost: list[str] = []
    trouble = asyncio.Event()

    def sink(event: DriverEvent) -> None:
        if isinstance(event, StationViolation):
            violations.append(str(event.error))
            trouble.set()
        elif isinstance(event, ConnectionChange) and not event.connected:
            lost.append(event.reason)
            trouble.set()

    driver = make_driver(name, plc, stations, sink)
    started = time.perf_counter()
    findings: list[Finding] = []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(driver.run(), name=f"doctor {name}")
        try:
            try:
                async with asyncio.timeout(plc.connect_timeout_s * 2 + plc.timeout_s):
                    await driver.wait_connected()
            except TimeoutError:
                reason = driver.statistics().last_error or "no answer"
                return [Finding("fail", subject, f"unreachable: {reason}")]
            took = time.perf_counter() - started
            findings.append(Finding("ok", subject, f"reachable ({plc.protocol}, {took:.2f} s)"))
            # A frozen heartbeat ends the connection after heartbeat_timeout_s.
            deadline = plc.heartbeat_timeout_s * 1.5
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline):
                    await trouble.wait()
            held = driver.connected
        finally:
            task.cancel()
    if violations:
        findings.extend(Finding("fail", subject, f"contract: {v}") for v in violations[:5])
    else:
        findings.append(Finding("ok", subject, f"contract right for {len(stations)} station(s)"))
    if lost or not held:
        reason = lost[0] if lost else "connection dropped"
        findings.append(Finding("fail", subject, f"heartbeat not moving: {reason}"))
    else:
        findings.append(Finding("ok", subject, f"heartbeat moving (watched {deadline:.1f} s)"))
    return findings


def certificate_files(name: str, plc: ModbusPlc | OpcUaPlc) -> list[tuple[str, Path]]:
    """(what, path) of every certificate the config names for a PLC."""
    files: list[tuple[str, Path]] = []
    if isinstance(plc, ModbusPlc) and plc.tls is not None:
        files += [("client certificate", plc.tls.certificate), ("CA", plc.tls.ca)]
    if isinstance(plc, OpcUaPlc) and plc.security is not None:
        files.append(("application certificate", plc.security.certificate))
        trust = plc.security.trust
        if isinstance(trust, list):
            files += [("trusted certificate", p) for p in trust]
        elif trust.is_dir():
            files += [("trusted certificate", p) for p in sorted(trust.iterdir()) if p.is_file()]
    return files


def check_certificates(line: Line, now: datetime | None = None) -> list[Finding]:
    from linectl.security import load_certificates

    now = now or datetime.now(UTC)
    findings = []
    for name, plc in line.plcs.items():
        for what, path in certificate_files(name, plc):
            subject = f"plc {name} {what} {path}"
            try:
                certs = load_certificates(path)
            except (OSError, ValueError) as exc:
                findings.append(Finding("fail", subject, f"unreadable: {exc}"))
                continue
            for cert in certs:
                left = (cert.not_valid_after_utc - now).total_seconds() / 86400
                if cert.not_valid_before_utc > now:
                    findings.append(Finding("fail", subject, "not valid yet"))
                elif left < 0:
                    findings.append(
                        Finding("fail", subject, f"expired {cert.not_valid_after_utc:%Y-%m-%d}")
                    )
                elif left < CERT_WARN_DAYS:
                    findings.append(
                        Finding("warn", subject, f"expires in {left:.0f} days; renew it")
                    )
                else:
                    findings.append(Finding("ok", subject, f"valid, {left:.0f} days to expiry"))
    return findings


# --- database, ports, clock -----------------------------------------------------------------


async def check_database(line: Line, url: str) -> tuple[list[Finding], datetime | None]:
    from linectl.store import TraceStore
    from linectl.store.db import mask

    subject = f"database {mask(url)}"
    findings: list[Finding] = []
    newest = None
    try:
        async with await TraceStore.open(url, line.line, create=False) as store:
            figures = await store.figures()
        newest = figures.newest_release_at
        findings.append(
            Finding(
                "ok",
                subject,
                f"reachable, schema version {figures.schema_version}, "
                f"{figures.size_bytes / 1e6:.1f} MB",
            )
        )
    except LinectlError as exc:
        text = str(exc)
        if "no such database file" in text or "no trace recorded here yet" in text:
            findings.append(Finding("warn", subject, "no trace yet; `linectl run` creates it"))
        elif "older than" in text:
            findings.append(Finding("warn", subject, text))
        else:
            findings.append(Finding("fail", subject, text))
    return findings, newest


def check_disk(url: str) -> list[Finding]:
    """Free space where a SQLite store lives (PostgreSQL's disk is the server's business)."""
    from linectl.store.db import parse_url

    findings: list[Finding] = []
    try:
        parsed = parse_url(url)
    except LinectlError:
        return findings  # check_database has said what is wrong with the URL
    if parsed.get_backend_name() == "sqlite":
        where = Path(os.path.abspath(parsed.database or ".")).parent
        try:
            free = shutil.disk_usage(where).free
        except OSError as exc:
            findings.append(Finding("fail", f"disk {where}", f"cannot measure: {exc}"))
        else:
            level = "fail" if free < DISK_FAIL_BYTES else "warn" if free < DISK_WARN_BYTES else "ok"
            findings.append(Finding(level, f"disk {where}", f"{free / 2**30:.1f} GiB free"))
    return findings


def _linectl_answers(host: str, port: int, path: str, line: str) -> bool:
    """Whether linectl serves ``line`` there: its metrics name it, its API's status is it."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as reply:
            body = reply.read(1 << 20)
    except urllib.error.HTTPError as exc:
        # The operator API asks for its token when LINECTL_API_TOKEN is set.
        return exc.code == 401 and b"operator token" in exc.read(4096)
    except (OSError, ValueError):
        return False
    if path == "/metrics":
        return f'line="{line}"'.encode() in body
    try:
        return json.loads(body).get("line") == line
    except (ValueError, AttributeError):
        return False


async def check_ports(line: Line) -> list[Finding]:
    findings = []
    for what, endpoint, path in (
        ("metrics", line.metrics, "/metrics"),
        ("api", line.api, "/status"),
    ):
        subject = f"port {endpoint.host}:{endpoint.port} ({what})"
        if endpoint.port == 0:
            findings.append(Finding("ok", subject, "a free port is picked at start"))
            continue
        with socket.socket() as sock:
            try:
                sock.bind((endpoint.host, endpoint.port))
            except OSError as exc:
                busy = exc
            else:
                findings.append(Finding("ok", subject, "free"))
                continue
        if await asyncio.to_thread(_linectl_answers, endpoint.host, endpoint.port, path, line.line):
            findings.append(Finding("ok", subject, "held by a running linectl"))
        else:
            findings.append(Finding("fail", subject, f"taken by another program ({busy.strerror})"))
    return findings


def check_clock(newest: datetime | None, now: datetime | None = None) -> Finding:
    now = now or datetime.now(UTC)
    if now.year < 2024:
        return Finding("fail", "clock", f"reads {now:%Y-%m-%d}: not set")
    if newest is not None and newest > now:
        behind = (newest - now).total_seconds()
        if behind > 5:
            return Finding(
                "fail", "clock", f"{behind:.0f} s behind the newest release in the store"
            )
    return Finding("ok", "clock", f"{now:%Y-%m-%d %H:%M:%S} UTC, not behind the store")


async def examine(line: Line, *, db_url: str | None = None) -> list[Finding]:
    """Every check, PLCs probed concurrently; findings in a stable order."""
    async with asyncio.TaskGroup() as tg:
        plcs = [tg.create_task(probe_plc(n, p, line)) for n, p in line.plcs.items()]
        database = tg.create_task(check_database(line, db_url or line.storage_url))
        ports = tg.create_task(check_ports(line))
    findings = [f for t in plcs for f in t.result()]
    findings += check_certificates(line)
    db, newest = database.result()
    findings += db
    findings += check_disk(db_url or line.storage_url)
    findings += ports.result()
    findings.append(check_clock(newest))
    return findings
