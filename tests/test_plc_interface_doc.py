"""docs/plc-interface.md states the same numbers as linectl/contract.py, so neither can rot."""

from __future__ import annotations

import re
from pathlib import Path

from linectl import contract as c

DOC = (Path(__file__).parent.parent / "docs" / "plc-interface.md").read_text(encoding="utf-8")


def table_rows(heading: str) -> list[list[str]]:
    """Cells of the first Markdown table after ``heading``."""
    rest = DOC[DOC.index(heading) :]
    rows = []
    for line in rest.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and the separator


def test_the_state_table_lists_every_packml_code():
    rows = table_rows("PackML state codes")
    pairs = {int(r[0]): r[1] for r in rows} | {int(r[3]): r[4] for r in rows}
    assert pairs == {s.value: s.label for s in c.State}


def test_the_command_status_table_matches_the_codes():
    codes = [int(r[0]) for r in table_rows("### 5.3 Command status")]
    assert codes == [s.value for s in c.CmdStatus]


def test_the_header_and_slot_tables_match_the_register_map():
    header = {r[1]: r[0] for r in table_rows("**Header**")}
    assert header["version"] == str(c.H_VERSION)
    assert header["slot_count"] == str(c.H_SLOTS)
    assert header["heartbeat"] == str(c.H_HEARTBEAT)
    assert header["cycle_count"] == f"{c.H_CYCLE_COUNT}–{c.H_CYCLE_COUNT + 1}"
    slot = {r[1]: r[0] for r in table_rows("**Slot** *s*")}
    for name, offset, words in [
        ("cmd_seq", c.S_CMD_SEQ, 2),
        ("cmd_code", c.S_CMD_CODE, 1),
        ("cmd_unit", c.S_CMD_UNIT, 2),
        ("ack_seq", c.S_ACK_SEQ, 2),
        ("state", c.S_STATE, 1),
        ("result", c.S_RESULT, 1),
        ("unit", c.S_UNIT, 2),
        ("fault_code", c.S_FAULT, 1),
        ("cmd_status", c.S_CMD_STATUS, 1),
        ("cycle_time_ms", c.S_CYCLE_MS, 2),
    ]:
        assert slot[name] == (str(offset) if words == 1 else f"{offset}–{offset + 1}"), name


def test_the_worked_example_addresses_follow_from_the_contract():
    """Station at base 100 with two slots: protocol addresses and their 4xxxx numbers."""
    offsets = {
        "cmd_seq (u32)": c.S_CMD_SEQ,
        "cmd_code": c.S_CMD_CODE,
        "cmd_unit (u32)": c.S_CMD_UNIT,
        "ack_seq (u32)": c.S_ACK_SEQ,
        "state": c.S_STATE,
        "result": c.S_RESULT,
        "unit (u32)": c.S_UNIT,
        "fault_code": c.S_FAULT,
        "cmd_status": c.S_CMD_STATUS,
        "cycle_time_ms (u32)": c.S_CYCLE_MS,
    }
    checked = 0
    for row in table_rows("### Worked example"):
        if row[0] not in offsets:
            continue
        for slot, (addr, ref) in enumerate([(row[1], row[2]), (row[3], row[4])]):
            first = c.slot_base(100, slot) + offsets[row[0]]
            assert int(re.split("–", addr)[0]) == first, (row[0], slot)
            assert int(re.split("–", ref)[0]) == 40001 + first, (row[0], slot)
        checked += 1
    assert checked == len(offsets)
    assert "100 … 139 = **40101 … 40140**" in DOC
    assert c.block_words(2) == 40
    assert c.command_address(100, 1) == 124


def test_the_doc_names_the_opcua_contract_as_the_code_does():
    for name in (
        c.OPCUA_NAMESPACE,
        c.OPCUA_ROOT,
        c.OPCUA_HEARTBEAT,
        c.OPCUA_CYCLE_COUNT,
        c.OPCUA_SLOT_COUNT,
        c.OPCUA_VERSION,
        c.OPCUA_STATUS,
        c.OPCUA_COMMAND,
    ):
        assert name in DOC, name
    fields = table_rows("**Status** is one array")[0][1:]
    assert tuple(fields) == c.STATUS_FIELDS


def test_the_modbus_answers_name_the_standard_exception_codes():
    """The table a PLC programmer reads: FC3 and FC16 served, every exception by its Modbus
    number and name, the read limit as the contract has it. tests/test_modbus_sim.py sends each
    row to the simulator."""
    answers = dict(table_rows("### What the PLC answers"))
    served = [request for request, answer in answers.items() if "exception" not in answer]
    assert [r.split()[0] for r in served] == ["FC3", "FC16"]
    names = {
        "01": "ILLEGAL FUNCTION",
        "02": "ILLEGAL DATA ADDRESS",
        "03": "ILLEGAL DATA VALUE",
        "0B": "GATEWAY TARGET DEVICE FAILED TO RESPOND",
    }
    for answer in answers.values():
        if answer.startswith("exception"):
            code = answer.split()[1]
            assert answer == f"exception {code} {names[code]}", answer
    assert f"FC3 of 1 … {c.MODBUS_MAX_READ} registers within the span" in answers
    assert f"FC3 of 0 or more than {c.MODBUS_MAX_READ} registers" in answers


def test_the_doc_says_what_a_plc_had_to_guess():
    """Issue 12 part 6: function codes, restarts of the command registers, an OPC UA command the
    PLC cannot evaluate, and whose clock cycle_time_ms is."""
    for phrase in (
        "A PLC must serve these two and nothing else is ever sent",
        "The **command registers** (cmd_seq, cmd_code, cmd_unit) need not survive",
        "**When the PLC cannot evaluate a command**",
        "**BadInvalidState** recommended",
        "**by the PLC's own wall clock**",
    ):
        assert phrase in DOC, phrase
