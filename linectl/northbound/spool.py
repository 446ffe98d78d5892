"""Store and forward: messages for a broker kept in order, in memory while it is up and on disk
while it is away, each store with a bound and a count of what was dropped past it.

``Outbox`` is what a publisher reads from: the spooled messages first, then the newer ones, so
the broker sees them in the order they were made. Putting never blocks and never awaits: the
event feed that calls it must not be slowed by a broker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("linectl.northbound")

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BBH")  # qos, retain, topic length


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False

    def encode(self) -> bytes:
        topic = self.topic.encode("utf-8")
        return _HEADER.pack(self.qos, int(self.retain), len(topic)) + topic + self.payload

    @classmethod
    def decode(cls, record: bytes) -> Message:
        qos, retain, n = _HEADER.unpack_from(record)
        start = _HEADER.size
        topic = record[start : start + n].decode("utf-8")
        return cls(topic, record[start + n :], qos, bool(retain))


class Spool:
    """A bounded FIFO of records in one append-only file, mirrored in memory.

    Past ``max_messages`` or ``max_bytes`` the oldest record is dropped (and counted): the
    newest state is what a SCADA needs most after an outage. A record is written to the file
    when appended (no fsync: it survives the controller, not the machine); the file is emptied
    once every record is forwarded, rewritten when mostly forwarded and on close. Records in
    the file at start (the controller stopped during an outage) are forwarded first; after a
    crash, a few already forwarded may be sent again (at least once, never lost).
    """

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int) -> None:
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0
        self.nbytes = 0
        self._records: deque[bytes] = deque()
        self._garbage = 0  # bytes at the head of the file already forwarded or dropped
        self._file: BinaryIO | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._file = open(path, "ab")  # owned until close()

    def _recover(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        at = 0
        while at + _LENGTH.size <= len(data):
            (n,) = _LENGTH.unpack_from(data, at)
            if at + _LENGTH.size + n > len(data):
                break  # a record cut short when the controller stopped
            self._records.append(data[at + _LENGTH.size : at + _LENGTH.size + n])
            self.nbytes += n
            at += _LENGTH.size + n
        if at < len(data):
            log.warning("spool %s: dropped a truncated record at its end", self.path)
        while len(self._records) > self.max_messages or self.nbytes > self.max_bytes:
            self._drop_oldest()
        self._rewrite()

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: bytes) -> None:
        if len(record) > self.max_bytes:
            self.dropped += 1
            return
        self._records.append(record)
        self.nbytes += len(record)
        assert self._file is not None
        self._file.write(_LENGTH.pack(len(record)) + record)
        self._file.flush()
        while len(self._records) > self.max_messages or self.nbytes > self.max_bytes:
            self._drop_oldest()

    def peek(self) -> bytes | None:
        return self._records[0] if self._records else None

    @property
    def records(self) -> deque[bytes]:
        return self._records

    def pop(self) -> None:
        record = self._records.popleft()
        self.nbytes -= len(record)
        self._garbage += _LENGTH.size + len(record)
        self._compact()

    def _drop_oldest(self) -> None:
        self.pop()
        self.dropped += 1

    def _compact(self) -> None:
        if not self._records and self._file is not None:
            self._file.truncate(0)
            self._file.seek(0)
            self._garbage = 0
        elif self._garbage > max(1 << 20, self.nbytes):
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for record in self._records:
                f.write(_LENGTH.pack(len(record)) + record)
        os.replace(tmp, self.path)
        if self._file is not None:
            self._file.close()
            self._file = open(self.path, "ab")
        self._garbage = 0

    def close(self) -> None:
        """Forget forwarded records on disk too; after a crash they would be sent again."""
        if self._garbage and self._file is not None:
            self._rewrite()
        if self._file is not None:
            self._file.close()
            self._file = None


class Outbox:
    """Messages for one broker connection, in order: the spool's, then the ones made since.

    While ``online`` and the spool is empty, messages wait in memory (``maxsize``; past it the
    oldest is dropped and counted, so a slow broker costs old telemetry, never a handover).
    Offline, or while older messages are still spooled, they go to the spool.
    """

    def __init__(self, spool: Spool, maxsize: int) -> None:
        self.spool = spool
        self.maxsize = maxsize
        self.online = False
        self.dropped = 0  # from memory, broker too slow
        self._memory: deque[Message] = deque()
        self._sending = 0  # memory messages at the head handed to the broker, unconfirmed
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self.spool) + len(self._memory)

    def put(self, message: Message) -> None:
        if self.online and not len(self.spool):
            if len(self._memory) >= self.maxsize:
                self.dropped += 1
                if len(self._memory) <= self._sending:
                    return  # all of them are in flight: this one is the oldest we can drop
                del self._memory[self._sending]  # the oldest not in flight
            self._memory.append(message)
        else:
            self.spool.append(message.encode())
        self._ready.set()

    def peek(self) -> tuple[Message, bool] | None:
        """The next message, and whether it comes from the spool (was delayed by an outage)."""
        record = self.spool.peek()
        if record is not None:
            return Message.decode(record), True
        return (self._memory[0], False) if self._memory else None

    def head(self, n: int, start: int = 0) -> list[tuple[Message, bool]]:
        """Messages ``start`` to ``n`` from the head, oldest first, as ``peek`` gives them;
        the first ``n`` are then counted as handed to the broker."""
        spooled = len(self.spool)
        out = [(Message.decode(r), True) for r in itertools.islice(self.spool.records, start, n)]
        first, end = max(0, start - spooled), max(0, n - spooled)
        out += [(m, False) for m in itertools.islice(self._memory, first, end)]
        self._sending = min(end, len(self._memory))
        return out

    def pop(self) -> None:
        if len(self.spool):
            self.spool.pop()
        else:
            self._memory.popleft()
            self._sending = max(0, self._sending - 1)

    async def changed(self) -> None:
        """Until the next ``put`` or ``wake()`` (a sender's own check came just before)."""
        self._ready.clear()
        await self._ready.wait()

    def wake(self) -> None:
        self._ready.set()

    def go_offline(self) -> None:
        """The broker is gone: what waits in memory goes to disk, in order, behind the spool."""
        self.online = False
        self._sending = 0
        while self._memory:
            self.spool.append(self._memory.popleft().encode())

    def go_online(self) -> None:
        self.online = True
