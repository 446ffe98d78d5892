"""Tokens waiting for room: one insertion-ordered queue per node they want to enter.

A dispatch pass asks each queue's oldest token first and stops at the first that cannot move:
whether a station, route or fork can take a unit does not depend on which unit it is, so the
rest of that queue cannot move either. A pass so costs the moves it makes plus one look per
node with a queue, instead of a sort and a look at every waiting token.
"""

from __future__ import annotations

from collections.abc import Iterator

from linectl.flow import Node
from linectl.linestate import Token


class Waiting:
    def __init__(self) -> None:
        self._queues: dict[int, dict[Token, None]] = {}  # id(node) -> tokens, oldest first
        self._key: dict[Token, int] = {}  # token -> the queue it is in
        self._arrival: dict[Token, int] = {}
        self._arrivals = 0

    def add(self, tok: Token) -> None:
        """Queue ``tok`` behind the others that want to enter ``tok.target``."""
        self.discard(tok)
        key = id(tok.target)
        self._queues.setdefault(key, {})[tok] = None
        self._key[tok] = key
        self._arrivals += 1
        self._arrival[tok] = self._arrivals

    def discard(self, tok: Token) -> None:
        key = self._key.pop(tok, None)
        if key is None:
            return
        del self._arrival[tok]
        queue = self._queues[key]
        del queue[tok]
        if not queue:
            del self._queues[key]

    def __contains__(self, tok: Token) -> bool:
        return tok in self._key

    def __len__(self) -> int:
        return len(self._key)

    def __iter__(self) -> Iterator[Token]:
        return iter(list(self._key))

    def count(self, node: Node) -> int:
        """Tokens waiting to enter ``node``."""
        return len(self._queues.get(id(node), ()))

    def queues(self) -> list[list[Token]]:
        """Every queue as a list, oldest first, the queues in the order of their oldest."""
        if len(self._queues) < 2:
            return [list(q) for q in self._queues.values()]
        ordered = sorted(self._queues.values(), key=lambda q: self._arrival[next(iter(q))])
        return [list(q) for q in ordered]
