"""Line configs: the bundled examples validate, and every mistake is reported where it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linectl.analysis import analyze
from linectl.cli import app
from linectl.config import ModbusPlc, load_config
from linectl.errors import ConfigError

CONFIG = Path(__file__).resolve().parent.parent / "config"
BUNDLED = sorted(CONFIG.glob("*.yaml"))

# Line numbers matter: the tests below expect problems at these lines.
BASE = """\
line: t
plcs:
  cell_a:
    protocol: modbus
    host: 127.0.0.1
    port: 15020
  cell_b:
    protocol: opcua
    url: opc.tcp://127.0.0.1:14840
stations:
  a1_solder: {plc: cell_a, address: 0, cycle_s: 10}
  a2_solder: {plc: cell_a, address: 100, cycle_s: 10}
  test: {plc: cell_b, address: Test, cycle_s: 5}
  pack: {plc: cell_b, address: Pack, cycle_s: 5}
flow:
  - route:
      branches:
        - [a1_solder]
        - [a2_solder]
  - test
  - pack
"""


def problems(tmp_path: Path, *edits: tuple[str, str]) -> tuple[str, list[str]]:
    """Apply each (old, new) edit to BASE once, load it from a file; the file and problems."""
    text = BASE
    for old, new in edits:
        assert old in text, f"test edit does not apply: {old!r}"
        text = text.replace(old, new, 1)
    path = tmp_path / "line.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(path), info.value.problems


# --- the bundled configs -----------------------------------------------------------------------


def test_config_directory_has_examples():
    assert len(BUNDLED) >= 5


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_config_validates_and_can_be_analysed(path: Path):
    line = load_config(path)
    assert analyze(line).interval_s > 0


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_config_says_what_it_shows_and_has_its_own_endpoints(path: Path):
    assert path.read_text().startswith("#"), "a bundled config opens with a comment"
    line = load_config(path)
    endpoints = [plc.where for plc in line.plcs.values()]
    assert len(set(endpoints)) == len(endpoints), "two PLCs share an endpoint"
    for plc in line.plcs.values():
        if isinstance(plc, ModbusPlc):
            assert plc.port >= 15000, "Modbus ports below 15000 may need privileges or clash"


def test_the_test_base_config_is_valid(tmp_path: Path):
    path = tmp_path / "line.yaml"
    path.write_text(BASE)
    assert load_config(path).line == "t"


# --- every mistake names the file, the line and the path inside the file -----------------------


def test_unknown_station_suggests_the_close_name(tmp_path: Path):
    path, found = problems(tmp_path, ("- [a2_solder]", "- [a2_soldr]"))
    assert found == [
        f"{path}:19: flow[0].route.branches[1][0]: unknown station 'a2_soldr' "
        "(did you mean 'a2_solder'?)"
    ]


def test_station_used_twice_in_a_flow(tmp_path: Path):
    path, found = problems(tmp_path, ("  - pack\n", "  - pack\n  - test\n"))
    assert found == [
        f"{path}:22: flow[3]: station 'test' is already used at flow[1]; "
        "a station may appear once in a flow"
    ]


def test_empty_route_branch(tmp_path: Path):
    path, found = problems(tmp_path, ("- [a2_solder]", "- []"))
    assert found == [
        f"{path}:19: flow[0].route.branches[1]: empty branch; "
        "remove it or give it at least one step"
    ]


def test_empty_fork_branch(tmp_path: Path):
    path, found = problems(tmp_path, ("  - test\n", "  - fork: [[test], []]\n"))
    assert found == [
        f"{path}:20: flow[1].fork[1]: empty branch; remove it or give it at least one step"
    ]


def test_capacity_below_one(tmp_path: Path):
    path, found = problems(tmp_path, ("cycle_s: 5}\n  pack", "cycle_s: 5, capacity: 0}\n  pack"))
    assert len(found) == 1
    assert found[0].startswith(f"{path}:13: stations.test.capacity: ")
    assert "greater than or equal to 1" in found[0]


def test_unknown_plc_suggests_the_close_name(tmp_path: Path):
    path, found = problems(tmp_path, ("{plc: cell_b, address: Pack", "{plc: cell_c, address: Pack"))
    assert found == [
        f"{path}:14: stations.pack.plc: unknown PLC 'cell_c' (did you mean 'cell_b'?); "
        "define it under plcs"
    ]


def test_two_opcua_stations_on_one_browse_name(tmp_path: Path):
    path, found = problems(tmp_path, ("address: Pack", "address: Test"))
    assert found == [
        f"{path}:14: stations.pack.address: PLC 'cell_b' address 'Test' is already used by "
        "station 'test'"
    ]


def test_two_modbus_stations_on_one_register(tmp_path: Path):
    path, found = problems(tmp_path, ("address: 100", "address: 0"))
    assert found == [
        f"{path}:12: stations.a2_solder.address: PLC 'cell_a' address 0 is already used by "
        "station 'a1_solder'"
    ]


def test_overlapping_modbus_blocks(tmp_path: Path):
    # a capacity-1 block is 8 + 16 = 24 registers: 0..23; 20 starts inside it
    path, found = problems(tmp_path, ("address: 100", "address: 20"))
    assert found == [
        f"{path}:12: stations.a2_solder.address: block 20.. overlaps station 'a1_solder' "
        "(0..23) on PLC 'cell_a'; each station needs its own registers"
    ]


def test_adjacent_modbus_blocks_do_not_overlap(tmp_path: Path):
    path = tmp_path / "line.yaml"
    path.write_text(BASE.replace("address: 100", "address: 24"))
    assert load_config(path).stations["a2_solder"].address == 24


def test_a_bigger_capacity_grows_the_block_into_the_next_station(tmp_path: Path):
    # capacity 6: 8 + 6 × 16 = 104 registers, 0..103, over a2_solder's block at 100
    path, found = problems(
        tmp_path, ("address: 0, cycle_s: 10}", "address: 0, cycle_s: 10, capacity: 6}")
    )
    assert found == [
        f"{path}:12: stations.a2_solder.address: block 100.. overlaps station 'a1_solder' "
        "(0..103) on PLC 'cell_a'; each station needs its own registers"
    ]


@pytest.mark.parametrize("host", ["127.0.0..1", "-plc", "plc_a.local", "127.0.0.256", "10.0.0"])
def test_malformed_host(tmp_path: Path, host: str):
    path, found = problems(tmp_path, ("host: 127.0.0.1", f"host: {host}"))
    assert found == [f"{path}:5: plcs.cell_a.host: '{host}' is not an IP address or host name"]


@pytest.mark.parametrize("host", ["localhost", "plc-a.factory.local", "10.1.2.3", "::1"])
def test_well_formed_host(tmp_path: Path, host: str):
    path = tmp_path / "line.yaml"
    path.write_text(BASE.replace("host: 127.0.0.1", f"host: '{host}'"))
    assert load_config(path).plcs["cell_a"].host == host


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:14840", "is not an opc.tcp://host:port URL"),
        ("opc.tcp://:14840", "is not an opc.tcp://host:port URL"),
        ("opc.tcp://127.0.0.1:99999", "has a malformed port"),
        ("opc.tcp://127.0.0.1:port", "has a malformed port"),
    ],
)
def test_malformed_opcua_url(tmp_path: Path, url: str, why: str):
    path, found = problems(tmp_path, ("url: opc.tcp://127.0.0.1:14840", f"url: {url}"))
    assert found == [f"{path}:9: plcs.cell_b.url: '{url}' {why}"]


def test_yaml_syntax_error_names_its_line(tmp_path: Path):
    # a key indented by three spaces under a mapping indented by four, on line 7
    path, found = problems(tmp_path, ("    port: 15020\n", "    port: 15020\n   bad: 1\n"))
    assert len(found) == 1
    assert found[0].startswith(f"{path}:7:4: YAML syntax error: ")


def test_empty_file_asks_for_a_mapping(tmp_path: Path):
    path = tmp_path / "line.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"line\.yaml: expected a mapping"):
        load_config(path)


def test_unknown_key(tmp_path: Path):
    path, found = problems(
        tmp_path, ("    port: 15020\n", "    port: 15020\n    pol_interval_s: 1\n")
    )
    assert found == [
        f"{path}:7: plcs.cell_a.pol_interval_s: unknown key; remove it or check its spelling"
    ]


def test_unknown_key_in_a_flow_mapping(tmp_path: Path):
    path, found = problems(
        tmp_path, ("      branches:", "      policy: round_robin\n      branch:")
    )
    assert f"{path}:18: flow[0].route.branch: unknown key; remove it or check its spelling" in found
    assert f"{path}:16: flow[0].route.branches: required key is missing" in found


def test_missing_required_key(tmp_path: Path):
    path, found = problems(tmp_path, ("address: Test, cycle_s: 5", "address: Test"))
    assert found == [f"{path}:13: stations.test.cycle_s: required key is missing"]


def test_unknown_protocol(tmp_path: Path):
    path, found = problems(tmp_path, ("protocol: opcua", "protocol: opc"))
    assert found == [f"{path}:7: plcs.cell_b: protocol must be 'modbus' or 'opcua'"]


def test_every_problem_is_reported_at_once(tmp_path: Path):
    path, found = problems(
        tmp_path,
        ("{plc: cell_b, address: Pack", "{plc: cell_c, address: Pack"),
        ("- [a2_solder]", "- [a2_soldr]"),
    )
    assert len(found) == 2
    assert all(p.startswith(f"{path}:") for p in found)


def test_unreadable_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


# --- linectl check and linectl schema ----------------------------------------------------------


def test_check_accepts_a_good_config():
    result = CliRunner().invoke(app, ["check", str(CONFIG / "demo.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok: line 'demo', 2 PLCs, 7 stations" in result.stdout


def test_check_rejects_a_bad_config_with_exit_2(tmp_path: Path):
    path = tmp_path / "line.yaml"
    path.write_text(BASE.replace("- [a2_solder]", "- [a2_soldr]"))
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 2
    assert f"{path}:19: flow[0].route.branches[1][0]: unknown station 'a2_soldr'" in result.stderr
    assert result.stdout == ""


def test_check_of_a_missing_file_exits_2(tmp_path: Path):
    result = CliRunner().invoke(app, ["check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: cannot read" in result.stderr


def test_schema_prints_the_json_schema():
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert {"line", "plcs", "stations", "flow"} <= set(schema["required"])
    assert "release" in schema["properties"]


def test_a_key_given_twice_is_an_error_not_a_silent_overwrite(tmp_path):
    path = tmp_path / "line.yaml"
    path.write_text(
        "line: x\nplcs: {a: {protocol: modbus, host: 127.0.0.1}}\nstations:\n"
        "  s: {plc: a, address: 0, cycle_s: 1}\n  s: {plc: a, address: 40, cycle_s: 2}\n"
        "flow: [s]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:5: stations.s: key 's' is given twice (lines 4 and 5); YAML would keep only "
        "the last"
    )


@pytest.mark.parametrize(
    ("metrics", "api", "clash"),
    [
        ("{port: 9500}", "{port: 9500}", True),
        ("{host: localhost, port: 9500}", "{port: 9500}", True),
        ("{host: 0.0.0.0, port: 9500}", "{host: 127.0.0.2, port: 9500}", True),
        ("{port: 9500}", "{port: 9501}", False),
        ("{host: 127.0.0.2, port: 9500}", "{port: 9500}", False),
        ("{port: 0}", "{port: 0}", False),  # each picks a free port
    ],
)
def test_metrics_and_api_on_one_port_and_address_is_a_config_error(tmp_path, metrics, api, clash):
    text = BASE + f"metrics: {metrics}\napi: {api}\n"
    path = tmp_path / "line.yaml"
    path.write_text(text)
    if not clash:
        load_config(path)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:23: api.port: port 9500 is also metrics.port on "
        f"{load_host(metrics)}; give the operator API and the metrics endpoint different ports"
    ]
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code != 0 and "api.port: port 9500 is also metrics.port" in result.output


def load_host(endpoint: str) -> str:
    return endpoint.split("host: ")[1].split(",")[0] if "host:" in endpoint else "127.0.0.1"


# --- bounded input: hostile or broken YAML is one line, fast, in little memory -------------------


def _bomb() -> str:
    """A "billion laughs": nine levels of nine aliases, 9**9 strings once expanded."""
    text = 'lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path):
    import tracemalloc

    path = tmp_path / "line.yaml"
    path.write_text(_bomb())
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.problems == [
        f"{path}:6: expands to more than 100000 values (aliases expanded); "
        "a line config is far smaller"
    ]
    assert peak < 5_000_000


@pytest.mark.parametrize(
    "text",
    ["line: &x [*x]\n", "line: t\nplcs: &p\n  cell_a: *p\n", "a: &x {b: [1, {c: *x}]}\n"],
)
def test_an_alias_inside_what_it_names_is_refused(tmp_path: Path, text: str):
    path = tmp_path / "line.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert (
        problem.startswith(f"{path}:") and "an alias refers to a node that contains it" in problem
    )


@pytest.mark.parametrize(
    "text",
    [
        "line: " + "[" * 3000 + "]" * 3000 + "\n",
        "line: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
        "line:\n" + "".join("  " * i + "- \n" for i in range(1, 400)),
        # shallow as written, 9 x 9 = 81 deep once expanded
        "a: &a "
        + "[" * 9
        + "1"
        + "]" * 9
        + "\n"
        + "".join(
            f"{n}: &{n} " + "[" * 9 + f"*{p}" + "]" * 9 + "\n"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ],
)
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path: Path, text: str):
    path = tmp_path / "line.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:") and "nested more than 64 levels deep" in problem


def test_a_file_over_a_mebibyte_is_refused(tmp_path: Path):
    path = tmp_path / "line.yaml"
    path.write_text(BASE + "# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: larger than 1048576 bytes; a line config is a few KiB"]


def test_a_byte_that_is_not_utf8_is_named_with_its_line_and_offset(tmp_path: Path):
    path = tmp_path / "line.yaml"
    path.write_bytes(BASE.encode() + "  # café\n".encode("latin-1"))
    offset = len(BASE.encode()) + len("  # caf")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:22: not UTF-8 text: byte 0xe9 at byte offset {offset}; save the file as UTF-8"
    ]


@pytest.mark.parametrize(
    ("old", "new", "where", "says"),
    [
        ("cycle_s: 10}", "cycle_s: .inf}", "11: stations.a1_solder.cycle_s", "finite number"),
        ("cycle_s: 5}", "cycle_s: .nan}", "13: stations.test.cycle_s", "finite number"),
        ("port: 15020", "port: 15020\n    timeout_s: .inf", "7: plcs.cell_a.timeout_s", "finite"),
        ("  - pack\n", "  - pack\ntime_scale: -.inf\n", "22: time_scale", "finite number"),
        ("cycle_s: 10}", "cycle_s: 1e308}", "11: stations.a1_solder.cycle_s", "at most 1e+12"),
        ("cycle_s: 10}", "cycle_s: '1e13'}", "11: stations.a1_solder.cycle_s", "at most 1e+12"),
    ],
)
def test_a_number_that_is_not_finite_or_too_large_is_refused(tmp_path, old, new, where, says):
    path, found = problems(tmp_path, (old, new))
    assert len(found) == 1 and found[0].startswith(f"{path}:{where}: ") and says in found[0]


def test_analyze_and_run_of_an_infinite_cycle_are_one_line_not_an_overflow(tmp_path: Path):
    path = tmp_path / "line.yaml"
    path.write_text(BASE.replace("cycle_s: 10}", "cycle_s: .inf}", 1))
    for command in (["analyze", str(path)], ["run", str(path)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "stations.a1_solder.cycle_s: Input should be a finite number" in result.output
