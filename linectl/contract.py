"""The station contract, as data: PackML codes, the Modbus register map, the OPC UA names.

docs/plc-interface.md is the same contract for a controls engineer. This module is pure: the
simulators and the drivers both encode and decode through it, so the two sides cannot drift.

Every station is one contiguous block of 16-bit holding registers: a header of
``HEADER_WORDS`` followed by ``capacity`` slots of ``SLOT_WORDS`` each. 32-bit values are two
registers, high word first (big-endian word order, as Modbus itself is big-endian).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

CONTRACT_VERSION = 1
OPCUA_NAMESPACE = "urn:linectl:station-contract:v1"
MODBUS_MAX_READ = 125  # registers in one Read Holding Registers request (Modbus spec)
U32_MAX = 0xFFFF_FFFF


class State(IntEnum):
    """PackML state codes (ISA-TR88.00.02, OPC 30050)."""

    UNDEFINED = 0
    CLEARING = 1
    STOPPED = 2
    STARTING = 3
    IDLE = 4
    SUSPENDED = 5
    EXECUTE = 6
    STOPPING = 7
    ABORTING = 8
    ABORTED = 9
    HOLDING = 10
    HELD = 11
    UNHOLDING = 12
    SUSPENDING = 13
    UNSUSPENDING = 14
    RESETTING = 15
    COMPLETING = 16
    COMPLETE = 17

    @property
    def label(self) -> str:
        return self.name.capitalize()


class Result(IntEnum):
    NONE = 0
    PASS = 1
    REJECT = 2


class Command(IntEnum):
    """What the controller asks of a slot."""

    START = 1  # Idle -> Execute with the given unit
    RESET = 2  # Complete -> Idle (unit handed on) or Aborted -> Idle (fault cleared, unit dropped)


class CmdStatus(IntEnum):
    """The PLC's verdict on the last command it evaluated (echoed with its sequence number)."""

    NONE = 0  # no command evaluated since power-up
    ACCEPTED = 1
    REFUSED_STATE = 2  # the slot's state does not allow that command
    REFUSED_CODE = 3  # unknown command code
    REFUSED_UNIT = 4  # START without a unit id (0)


# Header registers (offsets from the station's base address). Written by the PLC.
H_VERSION = 0
H_SLOTS = 1
H_HEARTBEAT = 2
H_CYCLE_COUNT = 4  # u32
HEADER_WORDS = 8

# Slot registers (offsets from the slot's base = station base + HEADER_WORDS + slot * SLOT_WORDS).
S_CMD_SEQ = 0  # u32, controller writes
S_CMD_CODE = 2  # controller writes
S_CMD_UNIT = 4  # u32, controller writes
COMMAND_WORDS = 6  # the controller writes exactly S_CMD_SEQ..S_CMD_UNIT+1 in one request
S_ACK_SEQ = 6  # u32, PLC writes from here on
S_STATE = 8
S_RESULT = 9
S_UNIT = 10  # u32
S_FAULT = 12
S_CMD_STATUS = 13
S_CYCLE_MS = 14  # u32
SLOT_WORDS = 16


def block_words(capacity: int) -> int:
    """Registers one station with ``capacity`` slots occupies."""
    return HEADER_WORDS + SLOT_WORDS * capacity


def slot_base(base: int, slot: int) -> int:
    return base + HEADER_WORDS + SLOT_WORDS * slot


def command_address(base: int, slot: int) -> int:
    """First register of a slot's command area: the one write the controller makes."""
    return slot_base(base, slot) + S_CMD_SEQ


class ContractViolation(ValueError):
    """A value outside the contract; the caller adds which PLC, station and register."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """What the PLC shows for one slot."""

    ack_seq: int = 0
    state: State = State.IDLE
    result: Result = Result.NONE
    unit: int = 0
    fault_code: int = 0
    cmd_status: CmdStatus = CmdStatus.NONE
    cycle_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class StationStatus:
    """What the PLC shows for one station: header and every slot."""

    heartbeat: int
    cycle_count: int
    slots: tuple[SlotStatus, ...]
    version: int = CONTRACT_VERSION


def _u32(words: list[int] | tuple[int, ...], i: int) -> int:
    return (words[i] << 16) | words[i + 1]


def _split(value: int) -> tuple[int, int]:
    return (value >> 16) & 0xFFFF, value & 0xFFFF


def is_newer(seq: int, ack_seq: int) -> bool:
    """Whether ``seq`` comes after ``ack_seq`` in u32 serial-number arithmetic (RFC 1982).

    The PLC evaluates a command only when this holds, so a repeated write (pymodbus re-sends
    after a timeout) or a stale one delivered late is never run; the numbers may wrap.
    """
    # 0 is never a command (a zeroed command area), whatever the arithmetic says.
    return seq != 0 and 0 < (seq - ack_seq) % (U32_MAX + 1) < 0x8000_0000


def command_words(seq: int, code: int, unit: int) -> list[int]:
    """A slot's command registers as they stand, without judging them (the PLC side)."""
    return [*_split(seq), code, 0, *_split(unit)]


def encode_command(seq: int, code: Command, unit: int) -> list[int]:
    """The ``COMMAND_WORDS`` registers of one command, written in one request."""
    if not 0 < seq <= U32_MAX:
        raise ValueError(f"sequence number {seq} outside 1..{U32_MAX}")
    if not 0 <= unit <= U32_MAX:
        raise ValueError(f"unit id {unit} outside 0..{U32_MAX}")
    return command_words(seq, int(code), unit)


def decode_command(words: list[int] | tuple[int, ...]) -> tuple[int, int, int]:
    """(seq, code, unit) from a slot's command registers; code is left raw for the PLC to judge."""
    return _u32(words, S_CMD_SEQ), words[S_CMD_CODE], _u32(words, S_CMD_UNIT)


def encode_slot_status(s: SlotStatus) -> list[int]:
    """The PLC-written registers of a slot, S_ACK_SEQ..SLOT_WORDS-1."""
    return [
        *_split(s.ack_seq),
        int(s.state),
        int(s.result),
        *_split(s.unit),
        s.fault_code,
        int(s.cmd_status),
        *_split(s.cycle_time_ms),
    ]


def encode_header(heartbeat: int, cycle_count: int, capacity: int) -> list[int]:
    return [CONTRACT_VERSION, capacity, heartbeat & 0xFFFF, 0, *_split(cycle_count & U32_MAX), 0, 0]


def _enum(kind: type[IntEnum], value: int, what: str, offset: int) -> IntEnum:
    try:
        return kind(value)
    except ValueError:
        raise ContractViolation(f"unknown {what} {value}", offset) from None


def decode_slot_status(words: list[int] | tuple[int, ...], offset: int = 0) -> SlotStatus:
    """Decode a slot's status from its SLOT_WORDS registers (the command area is ignored).

    ``offset`` is where ``words`` starts relative to the station base, so a violation can name
    the exact register.
    """
    return SlotStatus(
        ack_seq=_u32(words, S_ACK_SEQ),
        state=_enum(State, words[S_STATE], "state code", offset + S_STATE),
        result=_enum(Result, words[S_RESULT], "result code", offset + S_RESULT),
        unit=_u32(words, S_UNIT),
        fault_code=words[S_FAULT],
        cmd_status=_enum(CmdStatus, words[S_CMD_STATUS], "command status", offset + S_CMD_STATUS),
        cycle_time_ms=_u32(words, S_CYCLE_MS),
    )


def decode_station(words: list[int] | tuple[int, ...], capacity: int) -> StationStatus:
    """Decode one station block. Raises ContractViolation with the offending offset."""
    if len(words) < block_words(capacity):
        raise ContractViolation(
            f"block of {len(words)} registers, expected {block_words(capacity)}", 0
        )
    if words[H_VERSION] != CONTRACT_VERSION:
        raise ContractViolation(
            f"contract version {words[H_VERSION]}, expected {CONTRACT_VERSION}", H_VERSION
        )
    if words[H_SLOTS] != capacity:
        raise ContractViolation(
            f"PLC reports {words[H_SLOTS]} slots, config says capacity {capacity}", H_SLOTS
        )
    slots = []
    for i in range(capacity):
        start = HEADER_WORDS + SLOT_WORDS * i
        slots.append(decode_slot_status(words[start : start + SLOT_WORDS], start))
    return StationStatus(
        heartbeat=words[H_HEARTBEAT],
        cycle_count=_u32(words, H_CYCLE_COUNT),
        slots=tuple(slots),
    )


# OPC UA: an object OPCUA_ROOT under Objects, in OPCUA_NAMESPACE, holds the PLC's "Heartbeat"
# (UInt32) and one object per station (browse name = the station's address). A station object
# holds "CycleCount" (UInt32), "SlotCount" (UInt16), "ContractVersion" (UInt16) and one object
# "Slot<n>" (n from 1) per slot. A slot holds "Status", a UInt32 array in STATUS_FIELDS order
# that the PLC updates atomically (so a subscriber never sees half a change), and a method
# "Command(Seq: UInt32, Code: UInt16, Unit: UInt32) -> (AckSeq: UInt32, CmdStatus: UInt16)".
OPCUA_ROOT = "LinectlStations"
OPCUA_STATUS = "Status"
OPCUA_COMMAND = "Command"
OPCUA_HEARTBEAT = "Heartbeat"
OPCUA_CYCLE_COUNT = "CycleCount"
OPCUA_SLOT_COUNT = "SlotCount"
OPCUA_VERSION = "ContractVersion"
STATUS_FIELDS = ("ack_seq", "state", "result", "unit", "fault_code", "cmd_status", "cycle_time_ms")


def slot_name(slot: int) -> str:
    return f"Slot{slot + 1}"


def status_to_array(s: SlotStatus) -> list[int]:
    return [
        s.ack_seq,
        int(s.state),
        int(s.result),
        s.unit,
        s.fault_code,
        int(s.cmd_status),
        s.cycle_time_ms,
    ]


def status_from_array(values: list[int] | tuple[int, ...]) -> SlotStatus:
    if len(values) != len(STATUS_FIELDS):
        raise ContractViolation(
            f"Status array has {len(values)} elements, expected {len(STATUS_FIELDS)}", 0
        )
    return SlotStatus(
        ack_seq=int(values[0]),
        state=_enum(State, values[1], "state code", 1),
        result=_enum(Result, values[2], "result code", 2),
        unit=int(values[3]),
        fault_code=int(values[4]),
        cmd_status=_enum(CmdStatus, values[5], "command status", 5),
        cycle_time_ms=int(values[6]),
    )
