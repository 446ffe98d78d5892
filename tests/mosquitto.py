"""Mosquitto for tests: the machine's broker on 127.0.0.1:1883, or a private one on a free
loopback port that a test may stop and restart (never the machine's)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt

from tests.helpers import eventually

MACHINE_BROKER = ("127.0.0.1", 1883)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    """A topic level no other test (or helper, or earlier run) uses on the shared broker."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class PrivateBroker:
    """A mosquitto process of our own on 127.0.0.1:<port>, with persistence so that a
    persistent subscriber's queued messages (QoS 0 too) survive a restart."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.dir = workdir
        self.port = free_port()
        self.users = users or {}
        self.tls = tls  # (ca, certificate, key): a second listener, on tls_port
        self.tls_port = free_port() if tls else 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.dir}/",
            "queue_qos0_messages true",
            "max_queued_messages 0",
            "log_dest none",
            # Run as root, mosquitto would drop to user 'mosquitto', who cannot read our files.
            f"user {getpass.getuser()}",
        ]
        if self.users:
            pw = self.dir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pw), user, password], check=True, timeout=10
                )
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            ca, cert, key = self.tls
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {ca}",
                f"certfile {cert}",
                f"keyfile {key}",
                "require_certificate false",
            ]
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    async def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        # Popen, polled, not asyncio's subprocesses: their child-watcher thread was seen to
        # hang tests that start processes on a heavily loaded machine.
        self.proc = subprocess.Popen([binary, "-c", str(self._config())])  # noqa: ASYNC220

        def accepting() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        await eventually(accepting, within=10, what=f"mosquitto on port {self.port}")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: mosquitto saves its persistence file, then exits
        try:
            await eventually(lambda: proc.poll() is not None, within=10, what="mosquitto exit")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


@contextlib.asynccontextmanager
async def private_broker(workdir: Path, **kwargs) -> AsyncIterator[PrivateBroker]:
    broker = PrivateBroker(workdir, **kwargs)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


class Recorder:
    """A real MQTT subscriber that keeps every message it gets, in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []  # topic, payload, retain

    async def clear_retained(self, prefix: str, port: int = MACHINE_BROKER[1]) -> None:
        """Delete what this test left retained under ``prefix`` on a shared broker."""
        topics = {t for t, _, _ in self.messages if t.startswith(prefix)}
        async with aiomqtt.Client("127.0.0.1", port) as client:
            for topic in sorted(topics):
                await client.publish(topic, b"", qos=1, retain=True)

    def on(self, prefix: str) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p, _ in self.messages if t.startswith(prefix)]

    @contextlib.asynccontextmanager
    async def listening(
        self,
        topics: list[str],
        port: int = MACHINE_BROKER[1],
        *,
        identifier: str | None = None,
        clean: bool = True,
    ) -> AsyncIterator[Recorder]:
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=identifier, clean_session=clean
        ) as client:
            for topic in topics:
                await client.subscribe(topic, qos=1)

            async def read() -> None:
                async for m in client.messages:
                    payload = m.payload if isinstance(m.payload, bytes) else b""
                    self.messages.append((str(m.topic), payload, m.retain))

            task = asyncio.create_task(read(), name="recorder")
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task
