"""When to say again that something is still wrong: a reminder at a slowing interval.

A PLC that stays down is logged when it goes down, then again after 1 min, 2, 4, 8 ... up to
once an hour: never a flood, never silence. Pure: the caller passes the time it reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Reminder:
    """``due(now)`` is true when a reminder should be logged; ``reset()`` once recovered."""

    first_s: float = 60.0
    factor: float = 2.0
    max_s: float = 3600.0
    _next: float | None = None
    _gap: float = 0.0
    count: int = 0  # reminders given since the trouble began

    def __post_init__(self) -> None:
        if self.first_s <= 0 or self.factor < 1 or self.max_s < self.first_s:
            raise ValueError(
                f"reminder needs first_s > 0, factor >= 1, max_s >= first_s; got "
                f"{self.first_s}, {self.factor}, {self.max_s}"
            )

    def start(self, now: float) -> None:
        """The trouble began at ``now`` (its first log line is the caller's)."""
        self._gap = self.first_s
        self._next = now + self._gap
        self.count = 0

    def due(self, now: float) -> bool:
        """Whether to log a reminder at ``now``; starts the schedule if it has not begun."""
        if self._next is None:
            self.start(now)
            return False
        if now < self._next:
            return False
        self._gap = min(self._gap * self.factor, self.max_s)
        # From now, not from the missed deadline: a long outage of the caller does not make
        # several reminders due at once.
        self._next = now + self._gap
        self.count += 1
        return True

    def reset(self) -> None:
        self._next = None
        self.count = 0
