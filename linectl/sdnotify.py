"""The systemd notify protocol: one datagram per message to the socket in ``$NOTIFY_SOCKET``.

Written with the standard library rather than a dependency: the protocol is a newline-separated
``KEY=VALUE`` datagram on an AF_UNIX socket (sd_notify(3)), twenty lines, and the small PyPI
packages that wrap it add nothing we would use. An address starting with ``@`` is in Linux's
abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("linectl.service")

# A STATUS= text longer than this is cut: it is one line in `systemctl status`.
_MAX_STATUS = 200


class Notifier:
    """Sends notify messages to the service manager; a failed send is logged once, not raised
    (the line must not stop because the service manager went away)."""

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        if not address or address[0] not in "/@":
            raise ValueError(f"NOTIFY_SOCKET '{address}': need a path or an @abstract name")
        self.address = address
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier ``$NOTIFY_SOCKET`` asks for, or None when not run by a service manager.

        ``$WATCHDOG_USEC`` is honoured only if ``$WATCHDOG_PID`` is unset or this process.
        """
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        usec: int | None = None
        pid = env.get("WATCHDOG_PID", "")
        if env.get("WATCHDOG_USEC") and (not pid or pid == str(os.getpid())):
            try:
                usec = int(env["WATCHDOG_USEC"])
            except ValueError:
                log.warning("WATCHDOG_USEC '%s' is not a number; no watchdog", env["WATCHDOG_USEC"])
            else:
                usec = usec if usec > 0 else None
        return cls(address, usec)

    @property
    def watchdog_s(self) -> float | None:
        """The service manager's watchdog timeout in seconds, if it set one."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 1e6

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram: ``notify(READY=1, STATUS="...")``."""
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            if key == "STATUS":
                text = text[:_MAX_STATUS]
            lines.append(f"{key}={text}")
        try:
            self._sock.sendto("\n".join(lines).encode(), self._target)
        except OSError as exc:
            if self.failed == 0:
                log.warning("service manager at %s: cannot notify: %s", self.address, exc)
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def close(self) -> None:
        self._sock.close()
