"""A config change cannot strand units: each affected unit is named, and refused unless
--migrate maps it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linectl.cli import app
from linectl.config import parse_config
from linectl.configcheck import check_units, guard, parse_migrations, refused
from linectl.errors import ConfigError
from linectl.store import StepRecord, TraceStore, UnitRecord

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def config(flow: str = "[a, b, c]", b_capacity: int = 2, extra: str = "") -> str:
    return f"""
line: cc
plcs:
  p: {{protocol: modbus, host: 127.0.0.1, port: 1502}}
stations:
  a: {{plc: p, address: 0, cycle_s: 1}}
  b: {{plc: p, address: 40, cycle_s: 1, capacity: {b_capacity}}}
  c: {{plc: p, address: 80, cycle_s: 1}}
{extra}
flow: {flow}
"""


def step(station: str, n: int, *, slot: int = 0, done: bool = True) -> StepRecord:
    at = T0 + timedelta(seconds=10 * n)
    return StepRecord(
        unit_id=1,
        station=station,
        slot=slot,
        attempt=1,
        seq=n,
        commanded_at=at,
        accepted_at=at,
        finished_at=at + timedelta(seconds=5) if done else None,
        status="done" if done else "running",
        result="pass" if done else None,
        fault_code=0,
        plc_cycle_s=None,
    )


def unit(uid: int, status: str, *steps: StepRecord) -> UnitRecord:
    return UnitRecord(
        line="cc",
        unit_id=uid,
        serial=f"cc-{uid:06d}",
        status=status,
        released_at=T0,
        finished_at=None,
        branch=None,
        reason=None,
        quarantined_at=None,
        steps=steps,
    )


# Unit 1 has passed a and is in b; unit 2 finished; unit 3 sits in quarantine at b.
UNITS = [
    unit(1, "in_line", step("a", 1), step("b", 2, done=False)),
    unit(2, "finished", step("a", 1), step("b", 2), step("c", 3)),
    unit(3, "quarantined", step("a", 1), step("b", 2)),
]


def test_an_unchanged_config_strands_nobody():
    assert check_units(parse_config(config()), UNITS) == []


def test_a_removed_station_holding_a_unit_is_refused_with_one_line_naming_the_unit():
    line = parse_config(config("[a, c]"))
    (found,) = check_units(line, UNITS)
    assert str(found).startswith("unit cc-000001: has steps at station 'b', gone from the flow")
    assert "--migrate b=NEW_STATION or b=" in str(found)
    assert refused([found]) == [found]


def test_a_rename_mapped_with_migrate_moves_the_steps():
    line = parse_config(config("[a, c]"))
    (found,) = check_units(line, UNITS, {"b": "c"})
    assert found.resolution == "its steps move to 'c'"
    assert refused([found]) == []


def test_an_empty_mapping_accepts_quarantine_at_start():
    (found,) = check_units(parse_config(config("[a, c]")), UNITS, {"b": ""})
    assert found.resolution == "quarantined at start"


def test_a_reordered_flow_that_leaves_a_unit_nowhere_to_go_is_refused():
    (found,) = check_units(parse_config(config("[b, a, c]")), UNITS)
    assert found.station == "a"
    assert "the new flow leaves it nowhere to go" in str(found)
    assert not found.resolution


def test_a_capacity_below_the_slots_in_use_is_refused():
    in_slot_1 = unit(1, "in_line", step("a", 1), step("b", 2, slot=1, done=False))
    (found,) = check_units(parse_config(config(b_capacity=1)), [in_slot_1])
    assert "is in slot 1 of 'b', which has capacity 1 in this config" in str(found)


def test_a_mapping_that_does_not_help_stays_refused():
    # b renamed to a: the unit would have two steps at a, which the flow cannot follow.
    (found,) = check_units(parse_config(config("[a, c]")), UNITS, {"b": "a"})
    assert not found.resolution
    assert "after --migrate b=a" in str(found)


def test_bad_migrations_are_one_clear_line_each():
    assert parse_migrations(["b=c", "x="]) == {"b": "c", "x": ""}
    with pytest.raises(ConfigError) as caught:
        parse_migrations(["bc", "=c", "b=c", "b=d"])
    assert caught.value.problems == [
        "--migrate 'bc': write OLD=NEW (renamed) or OLD= (quarantine)",
        "--migrate '=c': write OLD=NEW (renamed) or OLD= (quarantine)",
        "--migrate 'b=d': 'b' is mapped twice",
    ]
    with pytest.raises(ConfigError, match="no station 'zz' in the flow"):
        check_units(parse_config(config()), UNITS, {"b": "zz"})


async def store_with_unit_in_b(url: str) -> None:
    async with await TraceStore.open(url, "cc") as store:
        await store.unit_released(1, "cc-000001", T0)
        await store.step_intended(1, "a", 0, 1, 1, T0)
        await store.step_finished(1, "a", 1, T0 + timedelta(seconds=5), "pass")
        await store.step_intended(1, "b", 0, 1, 2, T0 + timedelta(seconds=10))
        await store.unit_released(2, "cc-000002", T0)
        await store.unit_finished(2, T0)


def test_check_against_db_refuses_then_accepts_with_migrate(tmp_path):
    url = f"sqlite:///{tmp_path / 'cc.sqlite3'}"
    asyncio.run(store_with_unit_in_b(url))
    path = tmp_path / "v2.yaml"
    path.write_text(config("[a, c]"))
    runner = CliRunner()
    same = tmp_path / "v1.yaml"
    same.write_text(config())
    ok = runner.invoke(app, ["check", str(same), "--against-db", url])
    assert ok.exit_code == 0, ok.output
    assert "the units in the line fit" in ok.output
    bad = runner.invoke(app, ["check", str(path), "--against-db", url])
    assert bad.exit_code == 1
    assert f"{path}: unit cc-000001: has steps at station 'b'" in bad.output
    assert "refused: 1 unit(s) in the line would be stranded" in bad.output
    good = runner.invoke(app, ["check", str(path), "--against-db", url, "--migrate", "b=c"])
    assert good.exit_code == 0, good.output
    assert "its steps move to 'c'" in good.output


def test_run_refuses_a_config_that_strands_units_before_touching_a_plc(tmp_path):
    url = f"sqlite:///{tmp_path / 'cc.sqlite3'}"
    asyncio.run(store_with_unit_in_b(url))
    path = tmp_path / "v2.yaml"
    path.write_text(config("[a, c]", extra=f"storage: {{url: '{url}'}}"))
    done = CliRunner().invoke(app, ["run", str(path)])
    assert done.exit_code == 2
    assert f"{path}: unit cc-000001: has steps at station 'b', gone from the flow" in (done.output)
    assert "Traceback" not in done.output


async def test_guard_applies_a_rename_to_the_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'cc.sqlite3'}"
    await store_with_unit_in_b(url)
    line = parse_config(config("[a, c]"))
    async with await TraceStore.open(url, "cc") as store:
        with pytest.raises(ConfigError, match="cc-000001"):
            await guard(store, line, {}, "v2.yaml")
        found = await guard(store, line, {"b": "c"}, "v2.yaml")
        assert [f.serial for f in found] == ["cc-000001"]
        (rec,) = await store.open_units()
    assert [s.station for s in rec.steps] == ["a", "c"]
    assert rec.steps[1].slot == 0


def test_docs_name_the_mapping_syntax():
    text = (Path(__file__).parent.parent / "docs" / "service.md").read_text()
    assert "--migrate" in text
