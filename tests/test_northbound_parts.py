"""The pure parts of northbound: the store-and-forward spool and outbox, Sparkplug B's
sequence numbers, and the northbound config's one-line errors."""

from __future__ import annotations

import pytest

from linectl.config import parse_config
from linectl.errors import ConfigError
from linectl.northbound.sparkplug import (
    REBIRTH,
    EdgeNode,
    decode,
    payload,
    rebirth_requested,
    value_of,
)
from linectl.northbound.spool import Message, Outbox, Spool


def spool(tmp_path, **bounds) -> Spool:
    return Spool(
        tmp_path / "x.spool",
        max_messages=bounds.get("max_messages", 100),
        max_bytes=bounds.get("max_bytes", 1 << 20),
    )


def drain(s: Spool) -> list[bytes]:
    out = []
    while (record := s.peek()) is not None:
        out.append(record)
        s.pop()
    return out


def test_spool_keeps_order_and_survives_a_restart(tmp_path):
    s = spool(tmp_path)
    for i in range(5):
        s.append(b"m%d" % i)
    s.pop()
    s.close()
    again = spool(tmp_path)
    assert drain(again) == [b"m1", b"m2", b"m3", b"m4"]
    assert (tmp_path / "x.spool").stat().st_size == 0  # emptied once forwarded
    again.close()


def test_spool_past_its_bound_drops_the_oldest_and_counts_them(tmp_path):
    s = spool(tmp_path, max_messages=3)
    for i in range(10):
        s.append(b"m%d" % i)
    assert drain(s) == [b"m7", b"m8", b"m9"]
    assert s.dropped == 7
    s.close()
    by_bytes = Spool(tmp_path / "y.spool", max_messages=1000, max_bytes=1024)
    for _ in range(100):
        by_bytes.append(bytes(100))
    assert by_bytes.nbytes <= 1024 and len(by_bytes) == 10 and by_bytes.dropped == 90
    by_bytes.close()


def test_a_record_cut_short_at_the_end_is_dropped_not_misread(tmp_path):
    s = spool(tmp_path)
    s.append(b"whole")
    s.append(b"cut")
    s.close()
    path = tmp_path / "x.spool"
    path.write_bytes(path.read_bytes()[:-2])
    again = spool(tmp_path)
    assert drain(again) == [b"whole"]
    again.close()


def test_outbox_sends_the_spool_before_newer_messages_and_keeps_order_offline(tmp_path):
    box = Outbox(spool(tmp_path), maxsize=2)
    box.put(Message("t", b"1"))  # offline: to disk
    box.go_online()
    box.put(Message("t", b"2"))  # the spool still holds older ones: behind them, on disk
    got = []
    while (item := box.peek()) is not None:
        got.append((item[0].payload, item[1]))
        box.pop()
    assert got == [(b"1", True), (b"2", True)]
    for i in range(3, 6):
        box.put(Message("t", b"%d" % i, 1, True))  # online: memory, bounded at 2
    assert box.dropped == 1
    box.go_offline()  # memory moves to disk, in order
    assert [Message.decode(r) for r in drain(box.spool)] == [
        Message("t", b"4", 1, True),
        Message("t", b"5", 1, True),
    ]
    box.spool.close()


def test_sparkplug_seq_is_zero_in_nbirth_and_wraps_after_255():
    node = EdgeNode("g", "line", bd_seq=0)
    node.connecting()
    births = node.births({"Line/WIP": 0}, {"a": {"State": 1}, "b": {"State": -1}})
    assert [decode(p).seq for _, p in births] == [0, 1, 2]
    assert [t for t, _ in births] == [
        "spBv1.0/g/NBIRTH/line",
        "spBv1.0/g/DBIRTH/line/a",
        "spBv1.0/g/DBIRTH/line/b",
    ]
    assert value_of(decode(births[2][1]).metrics[0]) == -1
    data = payload({"State": 5}, 1).SerializeToString()
    seqs = [decode(node.data(data, historical=False)).seq for _ in range(300)]
    assert seqs[:3] == [3, 4, 5] and seqs[252:255] == [255, 0, 1]
    historical = decode(node.data(data, historical=True))
    assert all(m.is_historical for m in historical.metrics)
    # A new session: NBIRTH seq 0 again.
    node.connecting()
    assert decode(node.births({}, {})[0][1]).seq == 0


def test_bdseq_goes_up_per_connect_wraps_and_death_and_birth_agree():
    node = EdgeNode("g", "line", bd_seq=254)
    seen = []
    for _ in range(3):
        death = decode(node.connecting())
        assert not death.HasField("seq")  # NDEATH carries no seq
        birth = decode(node.births({}, {})[0][1])
        bd = {m.name: value_of(m) for m in birth.metrics}["bdSeq"]
        assert [value_of(m) for m in death.metrics] == [bd]
        seen.append(bd)
    assert seen == [254, 255, 0]


def test_rebirth_command_is_recognised_and_garbage_is_not():
    assert rebirth_requested(payload({REBIRTH: True}, 1).SerializeToString())
    assert not rebirth_requested(payload({REBIRTH: False}, 1).SerializeToString())
    assert not rebirth_requested(b"\xff\xff not protobuf")


BASE = """\
line: t
plcs: {p: {protocol: modbus, host: 127.0.0.1}}
stations: {a: {plc: p, address: 0, cycle_s: 1}}
flow: [a]
northbound:
"""


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "  mqtt: {uns: {topic_prefix: acme/+/x}}",
            "northbound.mqtt.uns.topic_prefix: topic_prefix level '+' must be one MQTT topic "
            "level, without + # or /",
        ),
        (
            "  mqtt: {uns: {topic_prefix: 'acme/#'}}",
            "northbound.mqtt.uns.topic_prefix: topic_prefix level '#' must be one MQTT",
        ),
        (
            "  mqtt: {sparkplug: {group_id: a/b}}",
            "northbound.mqtt.sparkplug.group_id: group_id 'a/b' must be one MQTT topic level",
        ),
        ("  mqtt: {port: 1883}", "northbound.mqtt: give uns, sparkplug or both"),
        (
            "  mqtt: {uns: {topic_prefix: a}, login: {user: u, password: x}}",
            "northbound.mqtt.login: a password must not be written in the config",
        ),
        ("  opcua: {port: 4841}", "northbound.opcua: needs security"),
        (
            "  opcua: {host: 10.1.2.3, allow_anonymous: true}",
            "northbound.opcua: allow_anonymous is only allowed on a loopback host",
        ),
        (
            "  opcua: {allow_anonymous: true, users: {op: {password_env: X}}}",
            "northbound.opcua: users need security",
        ),
    ],
)
def test_bad_northbound_config_is_one_line_naming_the_setting(section, message):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + section + "\n", "line.yaml")
    assert len(err.value.problems) == 1, err.value.problems
    assert message in err.value.problems[0]
    assert err.value.problems[0].startswith("line.yaml:")


def test_a_full_outbox_never_drops_a_message_that_is_in_flight(tmp_path):
    box = Outbox(spool(tmp_path), maxsize=3)
    box.go_online()
    for i in range(3):
        box.put(Message("t", b"%d" % i))
    assert [m.payload for m, _ in box.head(2)] == [b"0", b"1"]  # handed to the broker
    box.put(Message("t", b"3"))  # full: drops 2, the oldest not in flight
    box.pop()
    box.pop()  # 0 and 1 confirmed
    assert [m.payload for m, _ in box.head(10)] == [b"3"]
    assert box.dropped == 1
    box.spool.close()


def test_a_sliding_window_reads_on_from_where_it_left_and_spool_comes_first(tmp_path):
    box = Outbox(spool(tmp_path), maxsize=10)
    box.put(Message("t", b"s0"))  # offline: spooled
    box.go_online()
    for i in range(3):
        box.put(Message("t", b"%d" % i))  # behind the spool: spooled too, in order
    box.pop()  # s0 confirmed; the spool empties only as it is forwarded
    assert [m.payload for m, _ in box.head(2)] == [b"0", b"1"]
    assert [(m.payload, spooled) for m, spooled in box.head(4, start=2)] == [(b"2", True)]
    for _ in range(3):
        box.pop()
    box.put(Message("t", b"m0"))  # the spool is empty: memory
    box.put(Message("t", b"m1"))
    assert [m.payload for m, _ in box.head(1)] == [b"m0"]
    assert [(m.payload, spooled) for m, spooled in box.head(5, start=1)] == [(b"m1", False)]
    box.put(Message("t", b"m2"))
    assert [m.payload for m, _ in box.head(5, start=2)] == [b"m2"]
    box.spool.close()
