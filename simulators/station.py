"""A simulated station PLC, independent of the protocol that exposes it.

``SimStation`` is the station program of docs/plc-interface.md: it evaluates commands once per
sequence number, runs cycles on the event loop's clock, completes them with a result, faults
with a fault code and waits for a reset. The Modbus and OPC UA servers only map registers and
nodes onto it. ``SimPlc`` groups the stations of one PLC and owns their heartbeat.
"""

from __future__ import annotations

import asyncio
import math
import operator
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from linectl.config import SimSpec, Station
from linectl.contract import (
    CmdStatus,
    Command,
    Result,
    SlotStatus,
    State,
    command_words,
    encode_header,
    encode_slot_status,
    is_newer,
)

ChangeListener = Callable[["SimStation", int], None]

_FIELDS_OF = operator.attrgetter(*SlotStatus.__slots__)  # a status's fields, as a tuple
_FIELD_INDEX = {name: i for i, name in enumerate(SlotStatus.__slots__)}


class ScriptedCycle(NamedTuple):
    """One cycle a station replays instead of drawing it: ``cycle_s`` config seconds from START
    to Complete with ``result``, or, with a non-zero ``fault_code``, to Aborted with that code."""

    cycle_s: float
    result: Result = Result.PASS
    fault_code: int = 0


def sample_cycle(spec: SimSpec, cycle_s: float, rng: random.Random) -> float:
    """One cycle time in config seconds, drawn from the station's distribution (mean cycle_s)."""
    sd = spec.spread * cycle_s
    if spec.distribution == "fixed" or (sd == 0 and spec.distribution != "exponential"):
        return cycle_s
    if spec.distribution == "normal":
        value = rng.gauss(cycle_s, sd)
    elif spec.distribution == "lognormal":
        sigma2 = math.log(1 + (sd / cycle_s) ** 2)
        value = rng.lognormvariate(math.log(cycle_s) - sigma2 / 2, math.sqrt(sigma2))
    else:
        value = rng.expovariate(1 / cycle_s)
    # A real cycle is never instantaneous; the floor keeps a wide normal from going negative.
    return max(value, 0.05 * cycle_s)


@dataclass
class _Slot:
    status: SlotStatus
    command: tuple[int, int, int] = (0, 0, 0)  # last (seq, code, unit) written by the controller
    started_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    result: Result | None = None  # a scripted cycle's result, else drawn at completion


class SimStation:
    """One station: ``capacity`` slots, each running the command handshake on its own."""

    def __init__(
        self,
        name: str,
        config: Station,
        plc: SimPlc,
        time_scale: float = 1.0,
    ) -> None:
        self.name = name
        self.config = config
        self.plc = plc
        self.time_scale = time_scale
        seed = config.sim.seed
        # Without a seed, one derived from the name: the same in every process (hash() is not).
        self.rng = random.Random(seed if seed is not None else zlib.crc32(name.encode()))
        # Cycles to replay, in START order across slots; when it ends, cycles are drawn again.
        self.script: Iterator[ScriptedCycle] | None = None
        self._slots = [_Slot(SlotStatus()) for _ in range(config.capacity)]
        self.cycle_count = 0
        # Per unit id: cycles started, completed (pass or reject) and aborted by a fault here.
        self.starts: Counter[int] = Counter()
        # Per slot, per unit id: cycles started (the PLC's execution counter for exactly-once).
        self.slot_starts: list[Counter[int]] = [Counter() for _ in range(config.capacity)]
        self.completions: Counter[int] = Counter()
        self.aborts: Counter[int] = Counter()
        self.commands_evaluated = 0
        self.commands_repeated = 0

    @property
    def capacity(self) -> int:
        return self.config.capacity

    def status(self, slot: int) -> SlotStatus:
        return self._slots[slot].status

    def pending(self, slot: int) -> tuple[int, int, int]:
        """The command registers of ``slot`` as last written: (seq, code, unit)."""
        return self._slots[slot].command

    def words(self) -> list[int]:
        """The station's whole register block, as a Modbus read returns it."""
        out = encode_header(self.plc.heartbeat, self.cycle_count, self.capacity)
        for s in self._slots:
            out += command_words(*s.command) + encode_slot_status(s.status)
        return out

    # --- the program ------------------------------------------------------------------------

    def command(self, slot: int, seq: int, code: int, unit: int) -> SlotStatus:
        """Evaluate a command written to ``slot``, once: only a sequence number newer than the
        last one evaluated is acted on."""
        s = self._slots[slot]
        s.command = (seq, code, unit)
        if not self.plc.program_running:
            return s.status  # written, evaluated once the program runs again
        if not is_newer(seq, s.status.ack_seq):
            self.commands_repeated += 1  # a repeated or stale write: evaluated before
            return s.status
        self.commands_evaluated += 1
        state = s.status.state
        if code == Command.START:
            if unit == 0:
                verdict = CmdStatus.REFUSED_UNIT
            elif state != State.IDLE:
                verdict = CmdStatus.REFUSED_STATE
            else:
                self._start(slot, unit)
                verdict = CmdStatus.ACCEPTED
        elif code == Command.RESET:
            if state in (State.COMPLETE, State.ABORTED, State.IDLE):
                self._set(slot, state=State.IDLE, unit=0, result=Result.NONE, fault_code=0)
                verdict = CmdStatus.ACCEPTED
            else:
                verdict = CmdStatus.REFUSED_STATE
        else:
            verdict = CmdStatus.REFUSED_CODE
        return self._set(slot, ack_seq=seq, cmd_status=verdict)

    def _start(self, slot: int, unit: int) -> None:
        s = self._slots[slot]
        spec = self.config.sim
        loop = asyncio.get_running_loop()
        self.starts[unit] += 1
        self.slot_starts[slot][unit] += 1
        s.started_at = loop.time()
        self._set(slot, state=State.EXECUTE, unit=unit, result=Result.NONE, fault_code=0)
        scripted = next(self.script, None) if self.script is not None else None
        s.result = None
        if scripted is not None:
            duration = scripted.cycle_s * self.time_scale
            if scripted.fault_code:
                s.timer = loop.call_later(duration, self.fault, slot, scripted.fault_code)
            else:
                s.result = Result(scripted.result)
                s.timer = loop.call_later(duration, self._complete, slot)
            return
        duration = sample_cycle(spec, self.config.cycle_s, self.rng)
        if spec.fault_p and self.rng.random() < spec.fault_p:
            at = self.rng.uniform(0.1, 0.9) * duration * self.time_scale
            s.timer = loop.call_later(at, self.fault, slot, spec.fault_code)
        else:
            s.timer = loop.call_later(duration * self.time_scale, self._complete, slot)

    def _complete(self, slot: int) -> None:
        s = self._slots[slot]
        s.timer = None
        elapsed = asyncio.get_running_loop().time() - s.started_at
        spec = self.config.sim
        result = s.result
        if result is None:
            rejected = bool(spec.reject_p) and self.rng.random() < spec.reject_p
            result = Result.REJECT if rejected else Result.PASS
        self.cycle_count += 1
        self.completions[s.status.unit] += 1
        self._set(
            slot,
            state=State.COMPLETE,
            result=result,
            # The PLC measures in its own (config) time, so it compares with cycle_s.
            cycle_time_ms=round(elapsed / self.time_scale * 1000),
        )

    def _set(self, slot: int, **changes: object) -> SlotStatus:
        s = self._slots[slot]
        old = s.status
        # Positionally rather than dataclasses.replace: this runs for every change of a
        # virtual shift, and replace() introspects the fields each time.
        values = list(_FIELDS_OF(old))
        for name, value in changes.items():
            values[_FIELD_INDEX[name]] = value
        new = SlotStatus(*values)  # type: ignore[arg-type]
        if new != old:
            s.status = new
            self.plc.changed(self, slot)
        return new

    # --- fault injection --------------------------------------------------------------------

    def fault(self, slot: int = 0, code: int | None = None) -> None:
        """Abort ``slot`` now with a fault code; it stays Aborted until the controller resets."""
        s = self._slots[slot]
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        if s.status.unit:
            self.aborts[s.status.unit] += 1
        self._set(
            slot,
            state=State.ABORTED,
            result=Result.NONE,
            fault_code=code or self.config.sim.fault_code,
        )

    def violate(self, kind: str, slot: int = 0) -> None:
        """Show an out-of-contract value: ``state`` (code 99), ``unit`` (never commanded) or
        ``seq`` (echoed sequence number going backwards)."""
        s = self._slots[slot]
        if kind == "state":
            self._set(slot, state=99)
        elif kind == "unit":
            self._set(slot, unit=(s.status.unit or 0) + 0x7000_0000)
        elif kind == "seq":
            self._set(slot, ack_seq=max(s.status.ack_seq - 1, 0) if s.status.ack_seq > 1 else 0)
        else:
            raise ValueError(f"unknown violation kind {kind!r}; use state, unit or seq")

    def show(self, slot: int, status: SlotStatus) -> None:
        """Fault injection: show exactly ``status`` (e.g. the one from before a violation)."""
        self._set(slot, **{f: getattr(status, f) for f in SlotStatus.__slots__})

    def stop(self) -> None:
        for s in self._slots:
            if s.timer is not None:
                s.timer.cancel()
                s.timer = None

    def power_up(self) -> None:
        """Come back from a power cycle: every slot Idle, no unit, sequence numbers from 0."""
        self.stop()
        for i, s in enumerate(self._slots):
            s.command = (0, 0, 0)
            s.status = SlotStatus()
            self.plc.changed(self, i)


class SimPlc:
    """The stations of one simulated PLC and the heartbeat they share."""

    def __init__(
        self,
        name: str,
        stations: dict[str, Station],
        time_scale: float = 1.0,
        heartbeat_period_s: float = 0.1,
    ) -> None:
        self.name = name
        self.heartbeat = 0
        self.heartbeat_frozen = False
        self.program_running = True  # False: the PLC is in STOP (no scan, no heartbeat)
        self.heartbeat_period_s = heartbeat_period_s
        self._listeners: list[ChangeListener] = []
        self._heartbeat_listeners: list[Callable[[int], None]] = []
        self.stations = {n: SimStation(n, st, self, time_scale) for n, st in stations.items()}

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def on_heartbeat(self, listener: Callable[[int], None]) -> None:
        self._heartbeat_listeners.append(listener)

    def changed(self, station: SimStation, slot: int) -> None:
        for listener in self._listeners:
            listener(station, slot)

    async def run_heartbeat(self) -> None:
        """Advance the heartbeat every period until cancelled (frozen on request)."""
        while True:
            await asyncio.sleep(self.heartbeat_period_s)
            if not self.heartbeat_frozen:
                self.heartbeat = (self.heartbeat + 1) & 0xFFFF
                for listener in self._heartbeat_listeners:
                    listener(self.heartbeat)

    def freeze_heartbeat(self, frozen: bool = True) -> None:
        self.heartbeat_frozen = frozen

    def run_program(self, running: bool = True) -> None:
        """Fault injection: the PLC goes to STOP (False) or back to RUN. In STOP nothing is
        evaluated and the heartbeat stands still; commands written meanwhile (Modbus) are
        evaluated at the first scan after RUN; an OPC UA Command call is answered
        BadInvalidState."""
        self.program_running = running
        self.heartbeat_frozen = not running
        if running:
            for st in self.stations.values():
                for slot in range(st.capacity):
                    seq, code, unit = st.pending(slot)
                    if is_newer(seq, st.status(slot).ack_seq):
                        st.command(slot, seq, code, unit)

    def stop(self) -> None:
        for st in self.stations.values():
            st.stop()

    def power_cycle(self) -> None:
        """Fault injection: the PLC restarts and forgets every unit it was working on."""
        self.heartbeat = 0
        for st in self.stations.values():
            st.power_up()
