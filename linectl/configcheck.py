"""A config change must not strand the units in the line: compare a config with the store.

For every unit in the line the journal's steps are replayed through the new config's flow
(``recovery.replay``, what a restart does). A unit is affected when a step is at a station the
config no longer has, when the new flow cannot follow its steps (a unit left with no next
step), or when it sits in a slot past a station's new capacity. Each affected unit is one
line; the change is refused unless ``--migrate`` maps every station involved:

* ``OLD=NEW``: the station was renamed (or its work moved): the unit's steps at OLD count as
  steps at NEW (``linectl run`` rewrites them in the store before it starts);
* ``OLD=``: accept that the units affected at OLD are quarantined when the line starts, with
  the reason in the trace, for someone to look at and release.

Pure: the records come in, problems go out. Units in quarantine are not checked; they go back
into the line only when an operator releases them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from linectl.config import Line
from linectl.errors import ConfigError
from linectl.flow import compile_flow
from linectl.recovery import ReplayError, replay


@dataclass(frozen=True, slots=True)
class Affected:
    """One unit the config change would strand, and the station it is about."""

    unit_id: int
    serial: str
    station: str
    problem: str
    resolution: str = ""  # how --migrate resolves it; empty when it does not

    def __str__(self) -> str:
        text = f"unit {self.serial}: {self.problem}"
        return f"{text}; {self.resolution}" if self.resolution else text


def parse_migrations(items: Sequence[str]) -> dict[str, str]:
    """``["old=new", "gone="]`` as a mapping; a malformed item is a ConfigError naming it."""
    mapping: dict[str, str] = {}
    problems = []
    for item in items:
        old, sep, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old:
            problems.append(f"--migrate '{item}': write OLD=NEW (renamed) or OLD= (quarantine)")
        elif old in mapping and mapping[old] != new:
            problems.append(f"--migrate '{item}': '{old}' is mapped twice")
        else:
            mapping[old] = new
    if problems:
        raise ConfigError(problems)
    return mapping


def check_units(
    line: Line, units: Sequence, migrate: Mapping[str, str] | None = None
) -> list[Affected]:
    """Every in-line unit of ``units`` (UnitRecords with steps) the config would strand."""
    migrate = migrate or {}
    flow = compile_flow(line)
    problems = [
        f"--migrate {old}={new}: no station '{new}' in the flow"
        for old, new in migrate.items()
        if new and new not in flow.stations
    ]
    if problems:
        raise ConfigError(problems)
    found: list[Affected] = []
    for unit in units:
        if unit.status != "in_line":
            continue
        raw = _affected(line, flow, unit, list(unit.steps))
        if raw is None:
            continue
        station, problem = raw
        if station not in migrate:
            hint = f"map it with --migrate {station}=NEW_STATION or {station}= (quarantine)"
            found.append(Affected(unit.unit_id, unit.serial, station, f"{problem}; {hint}"))
            continue
        target = migrate[station]
        if not target:
            found.append(
                Affected(unit.unit_id, unit.serial, station, problem, "quarantined at start")
            )
            continue
        renamed = [
            dataclasses.replace(s, station=migrate.get(s.station) or s.station) for s in unit.steps
        ]
        again = _affected(line, flow, unit, renamed)
        if again is None:
            found.append(
                Affected(
                    unit.unit_id, unit.serial, station, problem, f"its steps move to '{target}'"
                )
            )
        else:
            found.append(
                Affected(
                    unit.unit_id,
                    unit.serial,
                    again[0],
                    f"after --migrate {station}={target}: {again[1]}",
                )
            )
    return found


def refused(found: Sequence[Affected]) -> list[Affected]:
    """The affected units ``--migrate`` does not resolve."""
    return [a for a in found if not a.resolution]


def _affected(line: Line, flow, unit, steps: list) -> tuple[str, str] | None:
    """(station, what is wrong) for the first problem of ``unit`` with ``steps``, or None."""
    for step in steps:
        if step.station not in flow.stations:
            return step.station, f"has steps at station '{step.station}', gone from the flow"
    releases = getattr(unit, "releases", ())
    for n in range(1, len(steps) + 1):
        try:
            placed = replay(flow, steps[:n], releases)
        except ReplayError as exc:
            return steps[n - 1].station, f"the new flow leaves it nowhere to go ({exc})"
    if not steps:
        return None
    for p in placed.tokens:
        capacity = line.stations[p.station].capacity if p.station else 0
        if p.station and p.slot is not None and p.slot >= capacity:
            return p.station, (
                f"is in slot {p.slot} of '{p.station}', which has capacity {capacity} in this "
                f"config"
            )
    return None


async def guard(store, line: Line, migrate: Mapping[str, str], source: str) -> list[Affected]:
    """At ``linectl run``'s start: refuse a config that strands units (ConfigError, one line
    per unit), else apply ``migrate``'s renames to the store; return the affected units."""
    found = check_units(line, await store.open_units(), migrate)
    bad = refused(found)
    if bad:
        raise ConfigError([f"{source}: {a}" for a in bad])
    renames = {old: new for old, new in migrate.items() if new}
    moved = [a.unit_id for a in found if a.station in renames]
    if moved:
        await store.rename_steps(renames, moved)
    return found
