"""Where a Modbus PLC's stations live: the reads that cover them and the registers linectl may
write. Pure functions of the config, used by the Modbus driver and tested on their own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from linectl.config import Station
from linectl.contract import COMMAND_WORDS, MODBUS_MAX_READ, block_words, command_address


@dataclass(frozen=True, slots=True)
class BlockRead:
    """One Read Holding Registers request and the station blocks it carries."""

    start: int
    count: int
    stations: tuple[tuple[str, int, int], ...]  # (station, offset in the read, capacity)


def plan_reads(stations: Mapping[str, Station], max_read: int = MODBUS_MAX_READ) -> list[BlockRead]:
    """The fewest reads of at most ``max_read`` registers that each carry whole station blocks.

    Blocks sorted by address are packed greedily, which is optimal for intervals on a line.
    Gaps between blocks are read too (and ignored): the PLC must answer them.
    """
    blocks = sorted(
        (int(st.address), block_words(st.capacity), n, st.capacity) for n, st in stations.items()
    )
    reads: list[BlockRead] = []
    group: list[tuple[int, int, str, int]] = []
    for block in blocks:
        if group and block[0] + block[1] - group[0][0] > max_read:
            reads.append(_read_of(group))
            group = []
        group.append(block)
    if group:
        reads.append(_read_of(group))
    return reads


def _read_of(group: list[tuple[int, int, str, int]]) -> BlockRead:
    start = group[0][0]
    end = max(base + size for base, size, _, _ in group)
    return BlockRead(start, end - start, tuple((n, b - start, c) for b, _, n, c in group))


@dataclass(frozen=True, slots=True)
class WriteArea:
    """Registers ``start``..``end - 1`` that linectl may write: one slot's command area."""

    start: int
    end: int
    station: str
    slot: int

    def __str__(self) -> str:
        return f"station '{self.station}' slot {self.slot}, registers {self.start}..{self.end - 1}"


def write_allow_list(stations: Mapping[str, Station]) -> tuple[WriteArea, ...]:
    """Every register linectl may write on one PLC, sorted: the ``COMMAND_WORDS`` command area
    of each slot of its stations (docs/plc-interface.md). Nothing else, ever."""
    areas = []
    for name, st in stations.items():
        for slot in range(st.capacity):
            first = command_address(int(st.address), slot)
            areas.append(WriteArea(first, first + COMMAND_WORDS, name, slot))
    return tuple(sorted(areas, key=lambda a: a.start))


def outside_allow_list(areas: tuple[WriteArea, ...], start: int, end: int) -> str:
    """Why a write of registers ``start``..``end - 1`` lies outside ``areas`` (an allow-list),
    naming the nearest area; "" when it lies within one of them."""
    if start < end and any(a.start <= start and end <= a.end for a in areas):
        return ""
    if not areas:
        return "this PLC has no stations, so linectl writes nothing to it"
    nearest = min(areas, key=lambda a: max(a.start - end, start - a.end, 0))
    return (
        f"linectl writes only within one command area of this PLC's stations (nearest: {nearest})"
    )
