"""What the plant sees of the line: the latest station, line and quarantine state, kept from
the supervisor's events (and read once from the supervisor at start). Pure: no I/O.

Each northbound part (unified namespace, Sparkplug B, OPC UA server) keeps one ``LineView``
from its own subscription and renders what changed in its own protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from linectl.events import LineChanged, LineEvent, StationChanged, UnitChanged


@dataclass
class LineView:
    line: LineChanged
    stations: dict[str, StationChanged]
    quarantined: dict[int, str] = field(default_factory=dict)  # unit id -> serial

    @classmethod
    def of(cls, sup: Any) -> LineView:
        """The line as the supervisor holds it now: the birth certificate's values."""
        line, stations = sup.current()
        quarantined = {uid: unit.serial for uid, unit in sup.quarantined.items()}
        return cls(line, stations, quarantined)

    def apply(self, event: LineEvent) -> None:
        if isinstance(event, StationChanged):
            self.stations[event.station] = event
        elif isinstance(event, LineChanged):
            self.line = event
        elif isinstance(event, UnitChanged):
            if event.kind == "quarantined":
                self.quarantined[event.unit_id] = event.serial
            elif event.kind == "quarantine_released":
                self.quarantined.pop(event.unit_id, None)


def station_values(ev: StationChanged) -> dict[str, Any]:
    """A station's state as plain values, the same names in every protocol."""
    return {
        "State": ev.state,
        "StateName": ev.state_name,
        "Condition": ev.condition,
        "UnitSerial": ",".join(ev.units),
        "Load": ev.load,
        "Capacity": ev.capacity,
        "InService": ev.in_service,
        "Connected": ev.connected,
        "Counts/Cycles": ev.cycles,
        "Counts/Passed": ev.passed,
        "Counts/Rejected": ev.rejected,
        "Counts/Faults": ev.faults,
    }


def line_values(ev: LineChanged, quarantined: int) -> dict[str, Any]:
    return {
        "Line/Released": ev.released,
        "Line/Finished": ev.finished,
        "Line/Quarantined": quarantined,
        "Line/WIP": ev.wip,
        "Line/Paused": ev.paused,
    }
