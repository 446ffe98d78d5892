"""Sparkplug B 3.0 for one line: the line is an edge node, each station a device.

Pure payload building and the sequence rules, no I/O (mqtt.py sends what this builds):

- ``bdSeq`` is the birth/death sequence: 0..255, one more at every MQTT CONNECT; the NDEATH
  registered as that connection's will and the NBIRTH sent on it carry the same value.
- ``seq`` is 0 in NBIRTH and one more (wrapping 255 -> 0) in every later DBIRTH, NDATA, DDATA
  of the session; NDEATH has none. A new session (reconnect, or a Rebirth request) starts
  again with NBIRTH seq 0 and every DBIRTH.
- Data delayed by an outage (store and forward) is sent after the births, as DDATA/NDATA whose
  metrics are flagged ``is_historical``, with the session's next seq.

Payloads are the Eclipse Tahu protobuf (sparkplug_b.proto, generated into sparkplug_b_pb2).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf.message import DecodeError

from linectl.northbound.sparkplug_b_pb2 import DataType, Payload

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"

# Each metric's Sparkplug datatype; names are station_values()/line_values() keys.
TYPES: dict[str, int] = {
    "bdSeq": DataType.Int64,
    REBIRTH: DataType.Boolean,
    "State": DataType.Int32,
    "StateName": DataType.String,
    "Condition": DataType.String,
    "UnitSerial": DataType.String,
    "Load": DataType.UInt32,
    "Capacity": DataType.UInt32,
    "InService": DataType.Boolean,
    "Connected": DataType.Boolean,
    "Counts/Cycles": DataType.UInt64,
    "Counts/Passed": DataType.UInt64,
    "Counts/Rejected": DataType.UInt64,
    "Counts/Faults": DataType.UInt64,
    "Line/Released": DataType.UInt64,
    "Line/Finished": DataType.UInt64,
    "Line/Quarantined": DataType.UInt32,
    "Line/WIP": DataType.UInt32,
    "Line/Paused": DataType.Boolean,
}
_FIELD = {
    DataType.Int32: "int_value",
    DataType.UInt32: "int_value",
    DataType.Int64: "long_value",
    DataType.UInt64: "long_value",
    DataType.Boolean: "boolean_value",
    DataType.String: "string_value",
}


# name -> (datatype, value field, two's complement mask for a signed type): looked up once,
# not per metric (protobuf's enum wrapper is slow to read).
_MASKS = {DataType.Int32: 0xFFFF_FFFF, DataType.Int64: 0xFFFF_FFFF_FFFF_FFFF}
_METRICS = {name: (t, _FIELD[t], _MASKS.get(t, 0)) for name, t in TYPES.items()}
_SEQ_TAG = 3 << 3  # Payload.seq: field 3, varint


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def millis(wall: datetime) -> int:
    return int(wall.timestamp() * 1000)


def topic(group: str, kind: str, node: str, device: str | None = None) -> str:
    return f"{NAMESPACE}/{group}/{kind}/{node}" + (f"/{device}" if device else "")


def payload(values: Mapping[str, Any], timestamp: int) -> Payload:
    """A payload without seq (stamped when it is sent) holding ``values`` as metrics."""
    p = Payload(timestamp=timestamp)
    add = p.metrics.add
    for name, value in values.items():
        datatype, field, mask = _METRICS[name]
        if mask and value < 0:
            value &= mask  # Sparkplug carries signed values two's complement
        add(name=name, timestamp=timestamp, datatype=datatype, **{field: value})
    return p


def value_of(metric: Any) -> Any:
    """A metric's value as Python, the inverse of ``payload`` (for tests and tools)."""
    field = _FIELD[metric.datatype]
    value = getattr(metric, field)
    if metric.datatype == DataType.Int32 and value >= 1 << 31:
        value -= 1 << 32
    return value


def decode(data: bytes) -> Payload:
    p = Payload()
    p.ParseFromString(data)
    return p


class EdgeNode:
    """The sequence numbers of one edge node (this line) across its MQTT sessions."""

    def __init__(self, group: str, node: str, bd_seq: int = 0) -> None:
        self.group = group
        self.node = node
        self.bd_seq = bd_seq % 256  # what the next CONNECT carries
        self.session_bd_seq: int | None = None
        self._seq = 0

    def connecting(self) -> bytes:
        """Take the bdSeq for a new CONNECT; return the NDEATH to register as its will."""
        self.session_bd_seq = self.bd_seq
        self.bd_seq = (self.bd_seq + 1) % 256
        return self.death()

    def death(self) -> bytes:
        assert self.session_bd_seq is not None, "connecting() first"
        return payload({"bdSeq": self.session_bd_seq}, now_ms()).SerializeToString()

    def births(
        self, line: Mapping[str, Any], devices: Mapping[str, Mapping[str, Any]]
    ) -> list[tuple[str, bytes]]:
        """NBIRTH (seq 0) and one DBIRTH per device: a session's first messages, in order."""
        assert self.session_bd_seq is not None, "connecting() first"
        ts = now_ms()
        self._seq = 0
        nbirth = payload({"bdSeq": self.session_bd_seq, REBIRTH: False, **line}, ts)
        out = [(topic(self.group, "NBIRTH", self.node), self._stamp(nbirth))]
        for device, values in devices.items():
            out.append(
                (topic(self.group, "DBIRTH", self.node, device), self._stamp(payload(values, ts)))
            )
        return out

    def data(self, data: bytes, *, historical: bool) -> bytes:
        """An NDATA/DDATA payload built without seq, stamped with the session's next one."""
        if historical:
            p = decode(data)
            for m in p.metrics:
                m.is_historical = True
            return self._stamp(p)
        # Appending the seq field to the serialized payload is the same message to any
        # protobuf parser (fields may come in any order), without decoding and encoding again.
        seq = self._next_seq()
        varint = bytes((seq,)) if seq < 0x80 else bytes((seq & 0x7F | 0x80, seq >> 7))
        return data + bytes((_SEQ_TAG,)) + varint

    def _stamp(self, p: Payload) -> bytes:
        p.seq = self._next_seq()
        return p.SerializeToString()

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq


def rebirth_requested(data: bytes) -> bool:
    """Whether an NCMD payload asks for a rebirth (metric Node Control/Rebirth = true)."""
    try:
        p = decode(data)
    except DecodeError:  # garbage on the command topic is no request
        return False
    return any(m.name == REBIRTH and m.boolean_value for m in p.metrics)
