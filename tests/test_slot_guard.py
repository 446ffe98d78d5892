"""The contract checks both drivers share, as a pure function of what a slot shows."""

from __future__ import annotations

from linectl.contract import SlotStatus, State
from linectl.drivers.base import SlotGuard

KEY = ("s", 0)


def test_the_first_status_is_the_baseline_whatever_it_shows():
    guard = SlotGuard()
    assert guard.check(KEY, SlotStatus(ack_seq=900, unit=42, state=State.EXECUTE)) is None
    assert guard.check(KEY, SlotStatus(ack_seq=900, unit=42, state=State.COMPLETE)) is None


def test_a_sequence_number_going_back_is_a_violation_but_wrapping_is_not():
    guard = SlotGuard()
    guard.baseline(KEY, SlotStatus(ack_seq=0xFFFF_FFFE))
    assert guard.check(KEY, SlotStatus(ack_seq=0xFFFF_FFFF)) is None
    assert guard.check(KEY, SlotStatus(ack_seq=1)) is None  # wrapped past 2^32 - 1
    assert guard.check(KEY, SlotStatus(ack_seq=0xFFFF_FFFF)) == (
        "ack_seq",
        "echoed sequence number went back from 1 to 4294967295",
    )


def test_a_unit_must_have_been_there_at_connect_or_commanded():
    guard = SlotGuard()
    guard.baseline(KEY, SlotStatus(ack_seq=3, unit=7))
    assert guard.check(KEY, SlotStatus(ack_seq=3, unit=7)) is None
    assert guard.check(KEY, SlotStatus(ack_seq=4, unit=8))[0] == "unit"
    guard.commanded(KEY, 8)
    assert guard.check(KEY, SlotStatus(ack_seq=4, unit=8)) is None


def test_a_reconnect_takes_a_new_baseline():
    """A PLC that restarted shows sequence number 0 again: not a violation after a connect."""
    guard = SlotGuard()
    guard.baseline(KEY, SlotStatus(ack_seq=50))
    guard.baseline(KEY, SlotStatus(ack_seq=0))
    assert guard.check(KEY, SlotStatus(ack_seq=0)) is None
