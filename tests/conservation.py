"""The conservation check every fault test ends with, and the kill soak counts by.

A pure function of the trace (units with their steps) and the simulators' execution counters:
every released unit is finished, quarantined or in the line, no station ran a step twice, and
every cycle a station ran is a done step of the trace. PLC sequence numbers only grow per slot.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise

from linectl.store import UnitRecord


@dataclass
class Conservation:
    units: int = 0
    finished: int = 0
    quarantined: int = 0
    in_line: int = 0
    lost: list[str] = field(default_factory=list)  # released, then nowhere
    twice: list[str] = field(default_factory=list)  # a station ran a unit's step again
    unrecorded: list[str] = field(default_factory=list)  # ran at a station, no done step
    phantom: list[str] = field(default_factory=list)  # a done step no station ran
    seq_backwards: list[str] = field(default_factory=list)  # a slot's sequence went back

    @property
    def problems(self) -> list[str]:
        return [*self.lost, *self.twice, *self.unrecorded, *self.phantom, *self.seq_backwards]


def conservation(
    units: Iterable[UnitRecord],
    completions: Mapping[str, Mapping[int, int]],
    *,
    in_progress: Iterable[int] | None = None,
    final: bool = True,
) -> Conservation:
    """Check ``units`` (the trace) against ``completions`` (per station, unit id -> cycles the
    simulator completed). ``in_progress``: unit ids the controller holds in the line, if
    known. Before the end (not ``final``) a unit in the line may have run a cycle the trace
    lacks yet."""
    c = Conservation()
    units = list(units)
    holding = None if in_progress is None else set(in_progress)
    by_slot: dict[tuple[str, int], list] = defaultdict(list)
    for u in units:
        c.units += 1
        if u.status == "finished":
            c.finished += 1
        elif u.status == "quarantined":
            c.quarantined += 1
        elif u.status == "in_line":
            c.in_line += 1
            if not final and holding is not None and u.unit_id not in holding:
                c.lost.append(f"{u.serial} is in the line but nobody holds it")
        else:
            c.lost.append(f"{u.serial} has status {u.status!r}")
        for s in u.steps:
            by_slot[s.station, s.slot].append(s)
    if final:
        c.lost.extend(f"{u.serial} never finished" for u in units if u.status == "in_line")
    done = Counter((s.station, u.unit_id) for u in units for s in u.steps if s.status == "done")
    # Before the end, only a unit the trace shows finished or quarantined must have every
    # cycle recorded: one in the line, or released after the trace was read, may be ahead.
    closed = {u.unit_id for u in units if u.status != "in_line"}
    for station, ran in completions.items():
        for unit, n in ran.items():
            if n > 1:
                c.twice.append(f"unit {unit} ran {n} times at {station}")
            if done[station, unit] < min(n, 1) and (final or unit in closed):
                c.unrecorded.append(f"unit {unit} ran at {station} but the trace has no step")
    for (station, unit), n in done.items():
        if completions.get(station, {}).get(unit, 0) < n:
            c.phantom.append(f"the trace has unit {unit} done at {station}; it never ran")
    for (station, slot), steps in by_slot.items():
        steps.sort(key=lambda s: s.commanded_at)
        for a, b in pairwise(steps):
            if b.seq <= a.seq and b.seq != 1:  # 1 follows 2**32 - 1
                c.seq_backwards.append(f"{station}[{slot}] seq {a.seq} then {b.seq}")
    return c
