"""No unit is lost or duplicated, whatever the order of events.

The dispatcher is driven directly: Hypothesis decides which pending command reaches its PLC
next, which working slot finishes and how (pass, reject, fault), and when the dispatcher looks
for work. The PLCs are the contract's state machine in a few lines; the invariants are checked
after every event, and at the end every unit must be finished or quarantined.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linectl.config import parse_config
from linectl.contract import CmdStatus, Result, SlotStatus, State, is_newer
from linectl.dispatcher import Dispatcher
from linectl.linestate import Slot

UNITS = 6
LINE = parse_config(
    f"""
line: prop
plcs: {{p: {{protocol: modbus, host: 127.0.0.1}}}}
stations:
  a:  {{plc: p, address: 0,   cycle_s: 1}}
  b1: {{plc: p, address: 40,  cycle_s: 1}}
  b2: {{plc: p, address: 80,  cycle_s: 1}}
  c:  {{plc: p, address: 120, cycle_s: 1}}
  d:  {{plc: p, address: 160, cycle_s: 1}}
  e:  {{plc: p, address: 200, cycle_s: 1, capacity: 2}}
flow:
  - a
  - route: {{policy: least_loaded, branches: [[b1], [b2]]}}
  - fork: [[c], [d]]
  - e
release: {{count: {UNITS}}}
retry: {{attempts: 2, backoff_s: 0}}
"""
)


class Harness:
    """The dispatcher's command port, queueing commands instead of sending them, with PLCs as
    plain state."""

    def __init__(self) -> None:
        self.d = Dispatcher(LINE, self)
        self.commands: list[tuple] = []
        self.completed: Counter[tuple[str, int]] = Counter()

    def send_start(self, tok, slot, previous) -> None:
        self.commands.append(("start", tok, slot, previous, tok.seq))

    def send_reset(self, slot, seq) -> None:
        self.commands.append(("reset", slot, seq))

    def show(self, slot: Slot, **changes) -> None:
        old = slot.status or SlotStatus()
        self.d.slot_changed(slot, SlotStatus(**{**_fields(old), **changes}), self.d.now())
        self.d.check_invariants()

    def deliver(self, index: int) -> None:
        command = self.commands.pop(index)
        if command[0] == "start":
            _, tok, slot, previous, seq = command
            if slot.status.state == State.IDLE:
                self.show(
                    slot,
                    ack_seq=seq,
                    state=State.EXECUTE,
                    unit=tok.unit.id,
                    result=Result.NONE,
                    cmd_status=CmdStatus.ACCEPTED,
                )
                self.d.start_confirmed(tok, slot, previous)
            else:
                self.show(slot, ack_seq=seq, cmd_status=CmdStatus.REFUSED_STATE)
                self.d.start_refused(tok, slot, previous)
        else:
            _, slot, seq = command
            assert is_newer(seq, slot.status.ack_seq)
            if slot.status.state in (State.COMPLETE, State.ABORTED, State.IDLE):
                self.show(
                    slot,
                    ack_seq=seq,
                    state=State.IDLE,
                    unit=0,
                    result=Result.NONE,
                    fault_code=0,
                    cmd_status=CmdStatus.ACCEPTED,
                )
            else:
                self.show(slot, ack_seq=seq, cmd_status=CmdStatus.REFUSED_STATE)
            self.d.reset_done(slot)
        self.d.check_invariants()

    def finish(self, slot: Slot, outcome: str) -> None:
        unit = slot.status.unit
        if outcome == "fault":
            self.show(slot, state=State.ABORTED, fault_code=9)
        else:
            self.completed[(slot.station.name, unit)] += 1
            result = Result.PASS if outcome == "pass" else Result.REJECT
            self.show(slot, state=State.COMPLETE, result=result, cycle_time_ms=1000)

    def executing(self) -> list[Slot]:
        return [
            slot
            for station in self.d.stations.values()
            for slot in station.slots
            if slot.status.state == State.EXECUTE
        ]


def _fields(s: SlotStatus) -> dict:
    return {name: getattr(s, name) for name in SlotStatus.__slots__}


async def drive(data: st.DataObject) -> Harness:
    h = Harness()
    d = h.d
    d.clock.start()
    for station in d.stations.values():
        station.connected = True
        for slot in station.slots:
            d.slot_changed(slot, SlotStatus(), d.now())
    for _ in range(400):
        d.dispatch()
        actions = ["dispatch"]
        if h.commands:
            actions.append("deliver")
        if h.executing():
            actions.append("finish")
        action = data.draw(st.sampled_from(actions))
        if action == "deliver":
            h.deliver(data.draw(st.integers(0, len(h.commands) - 1)))
        elif action == "finish":
            slot = data.draw(st.sampled_from(h.executing()))
            h.finish(slot, data.draw(st.sampled_from(["pass", "pass", "pass", "reject", "fault"])))
        if not d.units and d.released == UNITS:
            break
    # Then let the line run out in order: every command delivered, every cycle a pass.
    for _ in range(2000):
        d.dispatch()
        if h.commands:
            h.deliver(0)
        elif h.executing():
            h.finish(h.executing()[0], "pass")
        elif not d.units and d.released == UNITS:
            break
    return h


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_unit_ends_finished_or_quarantined_and_no_cycle_completes_twice(data):
    h = asyncio.run(drive(data))
    d = h.d
    assert d.released == UNITS
    assert d.finished + len(d.quarantined) == UNITS, (d.finished, len(d.quarantined), d.units)
    assert all(n == 1 for n in h.completed.values()), h.completed
    for unit in d.quarantined.values():
        assert unit.reason.startswith(("rejected at", "faulted 2 times at"))
    # Whatever happened, every slot ends Idle and free: nothing is left half-done.
    for station in d.stations.values():
        for slot in station.slots:
            assert slot.occupant is None and not slot.busy and not slot.needs_reset
            assert slot.status.state == State.IDLE, (slot.name, slot.status)
